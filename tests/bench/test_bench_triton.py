"""`bench triton` on two variants (forward and backward, bf16, BLOCK_N 16, sm_90): structure, the ptxas
figures, the roofline arithmetic against a hand count, and config errors."""

from __future__ import annotations

import json
import math
import sys

import pytest

from recsys_mamba.bench import __main__ as bench_cli
from recsys_mamba.bench import triton as bench_triton
from recsys_mamba.config import compose
from recsys_mamba.errors import RecsysError

SMALL = ["archs=[90]", "dtypes=[bf16]", "block_ns=[16]", "workers=1"]


def test_registered_with_the_dispatcher():
    assert "triton" in bench_cli.available()


def test_two_variants_through_the_entry_point(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench_triton.json"
    monkeypatch.setattr(sys, "argv", ["bench", *SMALL, f"output_json={out}", f"hydra.run.dir={tmp_path}/run"])
    bench_triton.main()
    result = json.loads(out.read_text())

    assert result["benchmark"] == "triton" and result["triton"] and set(result["ptxas"]) == {"sm_90"}
    assert [(r["kernel"], r["dtype"], r["BLOCK_N"]) for r in result["rows"]] == [("fwd", "bf16", 16),
                                                                               ("bwd", "bf16", 16)]
    for r in result["rows"]:
        t = r["targets"]["sm_90"]
        assert 0 < t["registers"] <= 255 and t["spill_stores"] == t["spill_loads"] == 0
        assert t["shared"] > 0 and t["cubin_bytes"] > 0
        f = r["roofline"]
        assert f["compulsory_bytes_per_token"] <= f["dram_bytes_per_token_estimate"]
        assert f["dram_bytes_per_token_estimate"] <= f["issued_bytes_per_token"]
        assert math.isclose(f["ratio"], f["estimate_us"] / f["bound_us"])
    # Forward, bf16, batch 64, dim 128, L 200, d_state 16, with D, z, delta_bias: u, delta, z read and
    # out written (2 bytes x 128 channels each), B and C read (2 x 16 x 2), last_state written
    # (128 x 16 x fp32 per sequence), A, D, delta_bias read once per launch.
    tokens = 64 * 200
    hand = 4 * 256 + 64 + 128 * 16 * 4 * 64 / tokens + (128 * 16 + 2 * 128) * 4 / tokens
    fwd = result["rows"][0]["roofline"]
    assert math.isclose(fwd["compulsory_bytes_per_token"], hand)
    assert math.isclose(fwd["bound_us"], hand * tokens / 3.35e12 * 1e6)
    assert result["goals"]["zero_spills"]["status"] == "met"
    assert "estimate" in result["method"]["roofline"].lower()
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically

    printed = capsys.readouterr().out
    assert "| fwd | bf16 | 16 | 16 | 32 | 8 |" in printed and "ESTIMATE" in printed
    assert "goal zero_spills: met" in printed and f"results: {out}" in printed


@pytest.mark.parametrize(("override", "key"), [
    ("archs=[75]", "archs"),
    ("dtypes=[fp64]", "dtypes"),
    ("block_ns=[3]", "block_ns"),
    ("roofline.groups=3", "roofline.groups"),
    ("goal_ratio=0.5", "goal_ratio"),
])
def test_bad_config_names_the_key(override, key):
    cfg = compose("bench_triton", [override], return_hydra_config=False)
    with pytest.raises(RecsysError, match=key.replace(".", r"\.")):
        bench_triton.validate_config(cfg)


def test_default_config_is_valid():
    bench_triton.validate_config(compose("bench_triton", ["output_json=/tmp/x.json"],
                                         return_hydra_config=False))


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_bytes_at_d_state_16_against_a_hand_count(deterministic):
    from recsys_mamba.ops.triton_traffic import Flags, ScanShape, roofline

    # bf16, batch 64, dim 128, L 200, d_state 16, D, z, delta_bias, softplus, dlast; per token: u, delta,
    # dout, z read (2 bytes x 128 channels each); du, ddelta, dz written (fp32); B, C read; 6 checkpoints
    # of 128 x 16 fp32 per sequence read (7 chunks, the first starts from zeros); dlast read, dA and dD
    # written per sequence; A, D, delta_bias read once per launch. dB and dC: with atomics, zero-filled
    # then written back once each; deterministic, 16 channel blocks of 8 each store a (16, 200) row of
    # partial sums per sequence.
    tokens = 64 * 200
    common = (4 * 256 + 3 * 128 * 4 + 2 * 16 * 2 + 128 * 16 * 4 * 6 / 200 + 2 * 128 * 16 * 4 / 200
              + 128 * 4 / 200 + (128 * 16 + 2 * 128) * 4 / tokens)
    dbc = 2 * 16 * 4 * (16 if deterministic else 2)
    r = roofline("bwd", ScanShape(64, 128, 200, 16), 2, Flags(deterministic=deterministic))
    assert math.isclose(r.dram_per_token, common + dbc)
    assert (r.ratio <= 1.5) is not deterministic  # the goal, met by the atomics
