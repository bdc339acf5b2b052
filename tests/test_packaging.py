"""The package installs as a wheel with its Hydra configs, and entry points find them from anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "recsys_mamba").rglob("__init__.py")
    }
    assert on_disk | {"recsys_mamba.conf"} == listed


def test_config_dir_in_checkout_is_top_level_conf() -> None:
    from recsys_mamba.config import config_dir

    assert config_dir() == REPO / "conf"


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(600)
def test_non_editable_install_finds_configs_from_another_folder(tmp_path: Path) -> None:
    """`pip install .` into a fresh venv (dependencies borrowed from this one), run from elsewhere."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    site = Path(
        _run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path
        ).stdout.strip()
    )
    # Dependencies come from the running environment through a .pth line; that directory's own .pth
    # files (our editable install) are not processed, so only the wheel provides recsys_mamba.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = _run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(REPO)], tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH"}}
    where = _run(
        [str(py), "-c", "import recsys_mamba.config as c; print(c.__file__); print(c.config_dir())"],
        elsewhere,
        env,
    )
    assert where.returncode == 0, where.stderr
    module_file, conf = where.stdout.split()
    assert str(site) in module_file and str(site) in conf, where.stdout

    shown = _run([str(py), "-m", "recsys_mamba.prepare", "--cfg", "job", "--resolve"], elsewhere, env)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "data_dir:" in shown.stdout and str(elsewhere) in shown.stdout


def test_entry_point_runs_from_checkout() -> None:
    shown = _run([sys.executable, "-m", "recsys_mamba.prepare", "--cfg", "job", "--resolve"], REPO)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert f"data_dir: {REPO}/data" in shown.stdout or "RECSYS_DATA_DIR" in os.environ
