"""Behaviour kept through refactors: shrunk versions of the main job and of an ML-100K next-click run
must give the metrics.json recorded before the layered redesign (commit 279b637), to 1e-6.

Bit-for-bit training results depend on the CPU's vector units and the library versions (they pick the
kernels and the order of float sums), so the comparison runs single-threaded and only where the
recorded fingerprint matches this machine; elsewhere the tests skip and say what differs. Record new
values on purpose only, with the command in tests/golden/README.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).with_name("golden") / "metrics_before_redesign.json"
SHARED = Path(
    os.environ.get("RECSYS_SHARED_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")
)
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Defaults changed on purpose since the recording; the runs keep the settings they were recorded with.
PINNED = {
    "ml100k_next_item": [
        "head.seen_bias=false",
        "head.transition_prior=false",
        "model.ffn=true",
        "model.d_model=32",
        "model.n_layers=1",
        "model.dropout=0.1",
        "model.expand=2",
        "trainer.max_epochs=3",
        "callbacks.early_stopping.patience=3",
        "datamodule.bucket_by_length=false",
        "module.loss_weighting=batch",
        "module.optimizer.lr=0.003",
    ]
}


def fingerprint() -> dict[str, str]:
    """What decides float results bit for bit, asked in a child with the tests' thread settings."""
    code = (
        "import json, torch, numba, polars, sklearn, numpy, llvmlite.binding as ll; print(json.dumps({"
        "'torch': torch.__version__, 'numba': numba.__version__, 'polars': polars.__version__, "
        "'scikit-learn': sklearn.__version__, 'numpy': numpy.__version__, "
        "'cpu_capability': torch.backends.cpu.get_cpu_capability(), 'host_cpu': ll.get_host_cpu_name()}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def golden() -> dict:
    recorded = json.loads(GOLDEN.read_text())
    here = fingerprint()
    differ = {k: (v, here.get(k)) for k, v in recorded["fingerprint"].items() if here.get(k) != v}
    if differ:
        pytest.skip(f"golden metrics were recorded on another machine or library version: {differ}")
    return recorded


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["main", "ml100k_next_item"])
def test_metrics_equal_the_ones_recorded_before_the_redesign(name: str, golden: dict, tmp_path: Path) -> None:
    run = golden["runs"][name]
    if "data=ml100k" in run["overrides"] and not (SHARED / "ml-100k" / "u.data").is_file():
        pytest.skip(f"{SHARED / 'ml-100k'} is absent (the real data sets live beside the checkout)")
    cmd = [
        sys.executable,
        "-m",
        "recsys_mamba.train",
        *run["overrides"],
        *PINNED.get(name, []),
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    proc = subprocess.run(cmd, env={**os.environ, **SINGLE_THREAD}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key, want in run["metrics"].items():
        if isinstance(want, float):
            assert got[key] == pytest.approx(want, abs=1e-6), key
        else:
            assert got[key] == want, key
