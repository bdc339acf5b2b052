"""Miniature `bench contention`: tiny shapes, one round; structure and the policy each worker ran under."""

from __future__ import annotations

import json

import pytest

from recsys_mamba.bench import contention
from recsys_mamba.config import compose
from recsys_mamba.errors import RecsysError


def _cfg(tmp_path, *extra: str):
    return compose("bench_contention", [
        "batch=2", "length=8", "d_model=8", "d_state=4", "n_items=20", "repeats=1", "rounds=1",
        f"output_json={tmp_path}/bench_contention.json", *extra,
    ], return_hydra_config=False)


def test_workers_run_under_their_policy_and_load(tmp_path):
    cfg = _cfg(tmp_path, "policies=[spin]", "loads=[0,1]")
    result = contention.benchmark(cfg)
    json.loads(json.dumps(result))
    assert [(r["policy"], r["load"]) for r in result["runs"]] == [("spin", 0), ("spin", 1)]
    for run in result["runs"]:
        # spin pins libgomp's own spin count, which the package import leaves alone
        assert run["env"] == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "300000"}
        assert all(run[w] > 0 for w in contention.WORKLOADS)
    quiet, loaded = result["rows"]
    assert quiet["scan_slowdown"] == quiet["torch_slowdown"] == 1.0
    assert loaded["scan_slowdown"] == pytest.approx(loaded["scan_ms"] / quiet["scan_ms"])
    assert "| spin | 1 |" in contention.markdown_table(result)


def test_slowdowns_are_per_round_ratios_and_goal_compares_scan_with_torch():
    def run(r, load, scan, ops):
        return {"round": r, "policy": "passive", "load": load, "scan": scan, "torch": ops, "train_step": 1.0}

    runs = [run(0, 0, 10, 10), run(0, 1, 20, 40), run(1, 0, 20, 10), run(1, 1, 30, 10), run(2, 0, 10, 10),
            run(2, 1, 40, 20)]
    rows = contention.summarize(runs, ["passive"], [0, 1])
    assert rows[1]["scan_ms"] == 30 and rows[1]["scan_slowdown"] == 2.0  # ratios 2, 1.5, 4
    assert rows[1]["torch_slowdown"] == 2.0  # ratios 4, 1, 2
    assert contention.goals(rows, "passive") == [
        {"load": 1, "scan_slowdown": 2.0, "torch_slowdown": 2.0, "met": True}
    ]


def test_bad_policy_is_refused(tmp_path):
    with pytest.raises(RecsysError, match="policies"):
        contention.BENCH_CONTENTION.validate(_cfg(tmp_path, "policies=[sometimes]"))
