"""The notebooks run top to bottom (nbclient) with outputs in a temp folder, and are committed clean."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"


def shared_data_dir() -> Path:
    return Path(os.environ.get("RECSYS_SHARED_DATA_DIR") or REPO.parent / "shared" / "data")


def run_notebook(name: str, out_dir: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    """Execute notebooks/<name> in a kernel whose cwd and outputs are under `out_dir`."""
    monkeypatch.setenv("RECSYS_NB_OUT_DIR", str(out_dir))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(out_dir)}}
    )
    client.execute()


def test_committed_notebooks_have_no_outputs() -> None:
    books = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert books, "no notebooks found"
    for path in books:
        book = nbformat.read(path, as_version=4)
        nbformat.validate(book)
        for cell in book.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [], f"{path.name}: a cell has outputs; clear them before committing"
                assert cell.execution_count is None, f"{path.name}: a cell has an execution count"


@pytest.mark.real_data
@pytest.mark.timeout(600)
def test_data_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = shared_data_dir()
    if not (data / "ml-100k" / "u.data").is_file():
        pytest.skip(f"real data folder absent: {data / 'ml-100k' / 'u.data'} not found")
    run_notebook("01_data.ipynb", tmp_path, monkeypatch, RECSYS_SHARED_DATA_DIR=str(data))
    for png in ("sequence_lengths.png", "item_popularity.png"):
        assert (tmp_path / png).stat().st_size > 0
    assert (tmp_path / "ml100k" / "manifest.json").is_file()


@pytest.mark.timeout(600)
def test_data_notebook_fails_clearly_without_real_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="real-data folder"):
        run_notebook("01_data.ipynb", tmp_path, monkeypatch, RECSYS_SHARED_DATA_DIR=str(tmp_path / "none"))


@pytest.mark.timeout(600)
def test_compare_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_notebook("02_compare.ipynb", tmp_path, monkeypatch, RECSYS_NB_QUICK="1")
    report = tmp_path / "report"
    for name in ("metrics.json", "report.md", "report.html"):
        assert (report / name).is_file()
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert (tmp_path / "comparison.csv").read_text().count("\n") == 3  # header + two models
