"""Miniature `bench encoders` (tiny models, two short lengths, one repeat): structure, limits, config
errors, and the exponent / crossover arithmetic on synthetic numbers. No timing is asserted."""

from __future__ import annotations

import json
import math
import statistics
import sys

import pytest

from recsys_mamba.bench import __main__ as bench_cli
from recsys_mamba.bench import encoders
from recsys_mamba.config import compose
from recsys_mamba.errors import RecsysError

TINY = ["lengths=[16,64]", "d_model=8", "n_layers=1", "n_items=50", "tokens_per_batch=64", "repeats=1",
        "warmup=1", "threads=1", "models.mamba.d_state=4"]


def _run_cli(tmp_path, monkeypatch, *extra: str) -> dict:
    out = tmp_path / "out"
    argv = ["bench", *TINY, f"out_dir={out}", f"hydra.run.dir={tmp_path}/run", *extra]
    monkeypatch.setattr(sys, "argv", argv)
    encoders.main()
    return json.loads((out / "bench_encoders.json").read_text())


def test_registered_with_the_dispatcher():
    assert "encoders" in bench_cli.available()


def test_miniature_benchmark_through_the_entry_point(tmp_path, monkeypatch, capsys):
    result = _run_cli(tmp_path, monkeypatch)

    assert result["benchmark"] == "encoders"
    assert {"cpus", "torch_threads", "torch", "device", "load_average_1m_at_start"} <= set(result["machine"])
    assert result["date"]
    assert result["machine"]["torch_threads"] == 1
    assert {"batch", "train_step", "infer_step", "peak_memory", "exponents"} <= result["method"].keys()
    cases = {(c["encoder"], c["length"]): c for c in result["cases"]}
    assert set(cases) == {(m, L) for m in ("mamba", "sasrec") for L in (16, 64)}
    for (_, length), c in cases.items():
        assert c["status"] == "ok" and c["reason"] is None
        assert c["batch"] == 64 // length and c["tokens_per_step"] == 64
        assert len(c["warmup"]) == 1 and len(c["repeats"]) == 1
        assert {"train_s", "infer_s"} <= c["repeats"][0].keys()
        assert {"train_s", "infer_s", "train_peak_mib", "infer_peak_mib"} <= c["memory"].keys()
        assert m_peak_ok(c)
        m = c["median"]
        assert m["train_tok_s"] > 0 and m["infer_tok_s"] > 0
        assert math.isclose(m["train_tok_s"], 64 / c["repeats"][0]["train_s"])
    assert result["pair"] == ["mamba", "sasrec"]
    assert [r["length"] for r in result["ratios"]] == [16, 64]
    assert set(result["crossover"]) == {"train", "infer"}
    assert {"length", "note"} <= result["crossover"]["train"].keys()
    assert set(result["fits"]) == {"mamba", "sasrec"}
    assert result["fits"]["mamba"]["lengths"] == []  # fit_range [1000, 16000] holds no measured length
    assert set(result["goals"]) == {"train_ratio_L200", "train_ratio_L4000", "mamba_memory_exponent"}
    assert all(g["status"] == "not measured" for g in result["goals"].values())
    assert result["wall_s"] > 0

    png = tmp_path / "out" / "bench_encoders.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob("*.tmp"))  # written atomically
    printed = capsys.readouterr().out
    assert "| 16 | 4 |" in printed and "goal train_ratio_L200" in printed and "results:" in printed


@pytest.mark.parametrize(("limit", "reason"), [
    ("max_seconds_per_case=0.2", "over max_seconds_per_case"),
    ("max_memory_gb=0.02", "resident memory passed max_memory_gb"),
])
def test_a_case_over_a_limit_is_skipped_not_hung(tmp_path, monkeypatch, capsys, limit, reason):
    result = _run_cli(tmp_path, monkeypatch, limit, "encoders=[mamba]")
    first, second = result["cases"]
    assert first["status"] == "skipped" and reason in first["reason"]
    assert second["status"] == "skipped" and "over a limit at the shorter L=16" in second["reason"]
    assert result["ratios"] == [] and result["pair"] is None
    assert (tmp_path / "out" / "bench_encoders.png").is_file()
    assert "- mamba L=64: skipped" in capsys.readouterr().out


def test_growth_exponent_recovers_known_slopes():
    lengths = [1000, 2000, 4000, 16000]
    assert encoders.growth_exponent(lengths, [3e-6 * L for L in lengths]) == pytest.approx(1.0)
    assert encoders.growth_exponent(lengths, [5e-9 * L**2 for L in lengths]) == pytest.approx(2.0)
    assert encoders.growth_exponent(lengths, [7.0] * 4) == pytest.approx(0.0, abs=1e-12)
    assert encoders.growth_exponent(lengths, [None, 2.0, None, 8.0]) == pytest.approx(2 / 3)  # 4x over 8x L
    assert encoders.growth_exponent([1000], [1.0]) is None
    assert encoders.growth_exponent([1000, 2000], [1.0, None]) is None


def test_crossover_on_synthetic_ratios():
    cross = encoders.crossover([50, 200, 1000], [0.5, 0.8, 2.0])
    expected = math.exp(math.log(200) - math.log(0.8) * math.log(1000 / 200) / math.log(2.0 / 0.8))
    assert cross["length"] == pytest.approx(expected) and 200 < cross["length"] < 1000
    assert encoders.crossover([1000, 50, 200], [2.0, 0.5, 0.8])["length"] == pytest.approx(expected)
    assert encoders.crossover([50, 200], [1.0, 3.0]) == {"length": None, "note": "below 50"}
    assert encoders.crossover([50, 200], [0.2, 0.9]) == {"length": None, "note": "not reached up to L=200"}
    # Ahead, behind, ahead again: the crossover is where it stays ahead.
    assert 200 < encoders.crossover([50, 200, 1000], [1.5, 0.9, 1.2])["length"] < 1000
    assert encoders.crossover([], [])["note"] == "not measured"


def m_peak_ok(case: dict) -> bool:
    """Peaks come from the memory steps, times from the timed repeats alone."""
    m, mem = case["median"], case["memory"]
    peaks = m["train_peak_mib"] == mem["train_peak_mib"] and m["infer_peak_mib"] == mem["infer_peak_mib"]
    return peaks and (mem["train_peak_mib"] is None or mem["train_peak_mib"] >= 0)


def _case(name: str, length: int, batch: int, seconds: float, mib: float) -> dict:
    tokens = batch * length
    return {"encoder": name, "length": length, "batch": batch, "status": "ok",
            "median": {"train_s": seconds, "infer_s": seconds / 3, "train_tok_s": tokens / seconds,
                       "infer_tok_s": 3 * tokens / seconds, "train_peak_mib": mib, "infer_peak_mib": mib / 4}}


def test_fits_ratios_and_goals_on_synthetic_cases():
    cases = []
    for length in (200, 1000, 4000, 16000):
        batch = max(1, 8192 // length)
        cases.append(_case("mamba", length, batch, 1e-5 * batch * length, 1e-3 * batch * length))
        cases.append(_case("sasrec", length, batch, 1e-8 * batch * length**2, 1e-6 * batch * length**2))
    result = {"pair": ["mamba", "sasrec"], "ratios": encoders.ratios(cases, "mamba", "sasrec"),
              "fits": encoders.fits(cases, ["mamba", "sasrec"], [1000, 16000])}
    assert result["fits"]["mamba"]["lengths"] == [1000, 4000, 16000]
    assert result["fits"]["mamba"]["train_s_exponent"] == pytest.approx(1.0)
    assert result["fits"]["mamba"]["train_peak_mib_exponent"] == pytest.approx(1.0)
    assert result["fits"]["sasrec"]["train_s_exponent"] == pytest.approx(2.0)
    assert result["fits"]["sasrec"]["infer_peak_mib_exponent"] == pytest.approx(2.0)
    # mamba / sasrec training tokens/s = 1e-8 L^2 / (1e-5 L) = L / 1000.
    assert [r["train"] for r in result["ratios"]] == pytest.approx([0.2, 1.0, 4.0, 16.0])
    goals = encoders.goals(result)
    assert goals["train_ratio_L200"] == {"value": pytest.approx(0.2), "target": ">= 1", "status": "not met"}
    assert goals["train_ratio_L4000"]["status"] == "met"
    assert goals["mamba_memory_exponent"]["status"] == "met"


@pytest.mark.parametrize(("override", "key"), [
    ("repeats=0", "repeats"),
    ("warmup=-1", "warmup"),
    ("tokens_per_batch=0", "tokens_per_batch"),
    ("lengths=[]", "lengths"),
    ("lengths=[100,0]", "lengths"),
    ("encoders=[mamba,gru4rec]", "encoders"),
    ("encoders=[mamba,mamba]", "encoders"),
    ("fit_range=[16000,1000]", "fit_range"),
    ("device=tpu", "device"),
    ("threads=0", "threads"),
    ("max_seconds_per_case=0", "max_seconds_per_case"),
    ("max_memory_gb=-1", "max_memory_gb"),
    ("d_model=7", "models.sasrec"),  # SASRec's 2 heads must divide d_model
])
def test_bad_config_values_are_rejected(override, key):
    cfg = compose("bench_encoders", [*TINY, override, "out_dir=unused"], return_hydra_config=False)
    with pytest.raises(RecsysError, match=key):
        encoders.check_config(cfg)


def test_bad_value_exits_cleanly_from_the_cli(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run_cli(tmp_path, monkeypatch, "repeats=0")
    assert exit_info.value.code == 2
    assert "error: bench encoders: repeats=0 must be an integer >= 1" in capsys.readouterr().err


def test_paired_ratio_pairs_repeat_by_repeat_and_drives_the_goal():
    # Repeat i of one encoder ran beside repeat i of the other: the paired ratio is the median of the
    # per-repeat ratios (sasrec seconds / mamba seconds), not the ratio of the two medians.
    def case(name: str, train_s: list[float]) -> dict:
        c = _case(name, 200, 40, statistics.median(train_s), 1.0)
        c["repeats"] = [{"train_s": t, "infer_s": t / 3} for t in train_s]
        return c

    cases = [case("mamba", [1.0, 2.0, 2.0]), case("sasrec", [2.1, 2.2, 1.1])]
    (r,) = encoders.ratios(cases, "mamba", "sasrec")
    assert r["train"] == pytest.approx(2.1 / 2.0)
    assert r["train_paired"] == {"median": pytest.approx(1.1), "q1": pytest.approx(0.825),
                                 "q3": pytest.approx(1.6), "n": 3}
    assert r["infer_paired"]["median"] == pytest.approx(1.1)
    result = {"pair": ["mamba", "sasrec"], "ratios": [r], "fits": {}}
    assert encoders.goals(result)["train_ratio_L200"]["value"] == pytest.approx(1.1)
    assert "paired over 3 repeats 1.10x (quartiles 0.83-1.60), ratio of medians 1.05x" in encoders.summary(
        result | {"crossover": {}, "goals": encoders.goals(result), "config": {"fit_range": [1, 2]},
                  "wall_s": 1.0})
