from __future__ import annotations

import json
import subprocess
import sys

import pytest

from recsys_mamba.bench.loss import benchmark, markdown_table, validate_config
from recsys_mamba.config import compose
from recsys_mamba.errors import RecsysError


def small(tmp_path, *overrides):
    return compose(
        "bench_loss",
        ["n_items=[50,9]", "tokens=[33,5]", "d_model=8", "repeats=2", f"output_json={tmp_path}/r.json",
         *overrides],
        return_hydra_config=False,
    )


def test_miniature_benchmark_times_both_methods_and_they_agree(tmp_path):
    rows = benchmark(small(tmp_path))
    assert [(r["n_items"], r["tokens"]) for r in rows] == [(50, 33), (9, 5)]
    for r in rows:
        assert r["unfused_ms"] > 0 and r["fused_ms"] > 0
        assert r["speedup"] == pytest.approx(r["unfused_ms"] / r["fused_ms"])
        assert r["loss_abs_diff"] < 1e-5 and r["grad_max_abs_diff"] < 1e-5
    assert markdown_table(rows).count("\n") == len(rows) + 1
    json.dumps(rows)


@pytest.mark.parametrize(
    ("override", "message"),
    [("tokens=[33]", "paired case by case"), ("repeats=0", "repeats"), ("n_items=[]", "n_items")],
)
def test_bad_settings_are_refused_by_name(tmp_path, override, message):
    with pytest.raises(RecsysError, match=message):
        validate_config(small(tmp_path, override))


def test_command_line_writes_the_json(tmp_path):
    out = tmp_path / "loss.json"
    proc = subprocess.run(
        [sys.executable, "-m", "recsys_mamba.bench", "loss", "n_items=[20]", "tokens=[10]", "d_model=4",
         "repeats=1", f"output_json={out}", f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(out.read_text())["rows"][0]["n_items"] == 20
    assert "| items |" in proc.stdout
