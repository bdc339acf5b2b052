"""`python -m recsys_mamba.bench serve` on a tiny bundle and synthetic events, a few requests: the
service starts as a subprocess, the phases run and report, and (slow) the kill -9 run loses nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys_mamba.config import compose
from tests.serve.conftest import export_tiny


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tmp_path_factory)["bundle"]


def run_bench(bundle: Path, out: Path, *overrides: str) -> dict:
    from recsys_mamba.bench.serve import benchmark, markdown, validate_config

    cfg = compose(
        "bench_serve",
        overrides=[
            "models=[mamba]", f"bundles.mamba={bundle}", "replay.ratings=null", "replay.synthetic_events=300",
            "replay.synthetic_users=15", "step_cost.histories=[10,100]", "step_cost.repeats=5",
            "ingest.clients=2", "ingest.events_per_request=10", "ingest.max_requests=4", "rates.per_s=[20]",
            "rates.seconds=0.5", f"output_json={out}", *overrides,
        ],
        return_hydra_config=False,
    )
    validate_config(cfg)
    result = benchmark(cfg)
    json.dumps(result)  # what write_result writes
    assert "goals:" in markdown(result)
    return result


def test_bench_serve_measures_the_service(bundle, tmp_path) -> None:
    result = run_bench(bundle, tmp_path / "b.json", "faults.enabled=false")
    mamba = result["models"]["mamba"]
    assert [r["H"] for r in mamba["step_cost"]["rows"]] == [10, 100]
    assert mamba["step_cost"]["rows"][0]["state_bytes"] == mamba["step_cost"]["rows"][1]["state_bytes"]
    load = mamba["load"]
    assert load["ingest"]["events_acked"] == 40 and load["ingest"]["statuses"] == {200: 4}
    assert load["rates"][0]["interactions"] == 10 and load["rates"][0]["errors"] == 0
    assert load["state_bytes_per_user"] > 0
    assert "mamba_step_growth" in result["goals"]
    from recsys_mamba.bench.serve import markdown

    assert markdown(result).count("| mamba |") == 2 + 1 + 1 + 1  # H rows, ingest, one rate, state bytes


@pytest.mark.slow
def test_bench_serve_kill_9_loses_nothing(bundle, tmp_path, reliability) -> None:
    result = run_bench(
        bundle, tmp_path / "b.json", "step_cost.enabled=false", "load.enabled=false", "faults.kills=2",
        "faults.users=4", "faults.min_up_s=0.3", "faults.max_up_s=0.6",
    )
    faults = result["faults"]
    for _ in range(faults["kills"]):
        reliability.fault("serve/sigkill", survived=True, data_lost=faults["acked_events_lost"] > 0)
    assert faults["events_acked"] > 0
    assert faults["acked_events_lost"] == 0 and faults["states_differing_from_replay"] == 0
