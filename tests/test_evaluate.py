"""The evaluate entry point: user mistakes give a clear message and a non-zero exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recsys_mamba.evaluate", *args, "hydra.run.dir=${oc.env:TMPDIR,/tmp}/hyd"],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("case", ["unknown_checkpoint", "unwritable_out_dir", "missing_checkpoint"])
def test_bad_input_exits_nonzero(case: str, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    args = {
        "unknown_checkpoint": [f"ckpt_path={tmp_path / 'nope.ckpt'}", f"out_dir={tmp_path / 'out'}"],
        "unwritable_out_dir": [f"ckpt_path={tmp_path / 'nope.ckpt'}", f"out_dir={blocker / 'out'}"],
        "missing_checkpoint": [f"out_dir={tmp_path / 'out'}"],
    }[case]
    expected = {
        "unknown_checkpoint": "does not exist",
        "unwritable_out_dir": "not writable",
        "missing_checkpoint": "ckpt_path is required",
    }[case]
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert "error: " in proc.stderr and expected in proc.stderr
    assert "Traceback" not in proc.stderr
