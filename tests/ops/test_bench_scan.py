from __future__ import annotations

import json

from recsys_mamba.bench.scan import benchmark, markdown_table
from recsys_mamba.config import compose


def test_miniature_benchmark_runs(tmp_path):
    cfg = compose("bench_scan", [
        "cases=[{length:9,batch:2}]", "dim=4", "d_states=[3]", "repeats=1",
        "backends=[cpu,ref,mambapy,ceiling]",
        f"output_json={tmp_path}/r.json",
    ], return_hydra_config=False)
    rows = benchmark(cfg)
    assert {r["backend"] for r in rows} == {"cpu", "ref", "mambapy", "ceiling"}
    assert all(r.get("fwd_tok_s", 1) > 0 for r in rows)
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1
    json.dumps(rows)
