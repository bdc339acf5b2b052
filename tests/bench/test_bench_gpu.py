"""`bench gpu` without a GPU: the refusal (exit status 2, one `error:` line, nothing written), and every
section run on CPU with the cpu scan backend and tiny sizes, which checks their structure, the
comparison against the float64 reference, the side-by-side ratios and the time budgets."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from recsys_mamba.bench import __main__ as bench_cli
from recsys_mamba.bench import gpu
from recsys_mamba.config import compose
from recsys_mamba.errors import RecsysError

TINY = [
    "compile.enabled=false", "correctness.d_states=[3,17]", "correctness.batch=1", "correctness.dim=8",
    "correctness.length=40", "correctness.groups=2", "scan.dim=8", "scan.d_state=4",
    "scan.cases=[{length:16,batch:2},{length:48,batch:1}]", "scan.repeats=2", "scan.warmup=1",
    "scan.ref_max_length=32", "train.lengths=[8,16]", "train.tokens_per_batch=32", "train.d_model=8",
    "train.n_layers=1", "train.n_items=20", "train.repeats=2", "train.warmup=1", "models.mamba.d_state=4",
]


def _cfg(tmp_path, *extra: str):
    return compose("bench_gpu", [*TINY, f"output_json={tmp_path}/bench_gpu.json", *extra],
                   return_hydra_config=False)


def test_registered_with_the_dispatcher():
    assert "gpu" in bench_cli.available()


def test_refuses_without_cuda_in_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "bench_gpu.json"
    monkeypatch.setattr(sys, "argv", ["bench", f"output_json={out}", f"hydra.run.dir={tmp_path}/run"])
    with pytest.raises(SystemExit) as exit_info:
        gpu.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: bench gpu needs a CUDA GPU")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the command would run")
def test_command_line_exits_2_on_a_machine_without_cuda(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "recsys_mamba.bench", "gpu", f"hydra.run.dir={tmp_path}/run",
         f"output_json={tmp_path}/bench_gpu.json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: bench gpu needs a CUDA GPU") and "Traceback" not in proc.stderr
    assert not (tmp_path / "bench_gpu.json").exists()


def test_every_section_on_cpu(tmp_path):
    cfg = _cfg(tmp_path)
    gpu.validate_config(cfg)
    written = []
    result = gpu.run(cfg, torch.device("cpu"), backend="cpu", write=lambda r: written.append(json.dumps(r)))

    assert [list(json.loads(w)["sections"]) for w in written] == [
        ["correctness"], ["correctness", "scan"], ["correctness", "scan", "train"]]
    c = result["sections"]["correctness"]
    # (2 dtypes) x (2 d_states x {all options, none} + grouped, with and without deterministic mode)
    assert len(c["rows"]) == 12 and c["failed"] == 0 and c["passed"] == 12 and not c["skipped"]
    assert [r["deterministic"] for r in c["rows"] if r["groups"]] == [False, True] * 2
    row = c["rows"][0]
    assert row["dtype"] == "fp32" and row["optional"] == list(gpu.OPTIONAL)
    assert set(row["tensors"]) == {"out", "last", "du", "ddelta", "dA", "dB", "dC", "dD", "dz",
                                   "ddelta_bias", "dinitial_state"}
    assert all(t["worst_ratio"] <= 1 and t["finite"] for t in row["tensors"].values())

    sc = result["sections"]["scan"]
    assert sc["baseline"] == "ref" and sc["mamba_ssm_version"] is None
    assert {(r["backend"], r["dtype"], r["length"]) for r in sc["rows"]} == {
        (b, dt, L) for b in ("cpu", "ref") for dt in ("fp32", "bf16") for L in (16, 48)} - {
        ("ref", "fp32", 48), ("ref", "bf16", 48)}
    assert len(sc["skipped"]) == 2 and all("ref_max_length" in s["reason"] for s in sc["skipped"])
    for r in sc["rows"]:
        assert r["fwd"]["repeats"] == 2 and r["fwd"]["median_s"] > 0 and r["fwd_bwd_tok_s"] > 0
        if r["backend"] == "cpu" and r["length"] == 16:
            ref = next(x for x in sc["rows"] if x["backend"] == "ref" and x["dtype"] == r["dtype"]
                       and x["length"] == 16)
            assert r["fwd_vs_ref"] == pytest.approx(r["fwd"]["median_s"] / ref["fwd"]["median_s"])

    tr = result["sections"]["train"]
    assert tr["precision"] == "bf16-mixed"
    assert {(r["encoder"], r["length"], r["batch"]) for r in tr["rows"]} == {
        (e, L, 32 // L) for e in ("mamba", "sasrec") for L in (8, 16)}
    assert all(r["repeats"] == 2 and r["train_tok_s"] > 0 for r in tr["rows"])
    assert [r["length"] for r in tr["ratios"]] == [8, 16]
    text = gpu.summary(result)
    assert "correctness vs float64 ref: 12 passed, 0 failed" in text and "| mamba | 8 | 4 |" in text


def test_budgets_stop_the_sections(tmp_path):
    cfg = _cfg(tmp_path, "correctness.budget_s=0", "scan.budget_s=0", "train.budget_s=0")
    start = time.monotonic()
    result = gpu.run(cfg, torch.device("cpu"), backend="cpu")
    assert time.monotonic() - start < 10
    s = result["sections"]
    assert s["correctness"]["rows"] == [] and len(s["correctness"]["skipped"]) == 12
    assert s["scan"]["rows"] == [] and len(s["scan"]["skipped"]) == 8
    assert s["train"]["rows"] == [] and len(s["train"]["skipped"]) == 4
    assert all("budget" in x["reason"] for x in s["scan"]["skipped"] + s["train"]["skipped"]
               if "ref_max_length" not in x["reason"])


def test_max_total_s_caps_every_section(tmp_path):
    budget = gpu.Budget(100.0, run_deadline=time.monotonic() - 1)
    assert budget.spent()
    assert gpu.fitting_repeats(20, 0.5, gpu.Budget(2.0, time.monotonic() + 100)) in (3, 4)
    assert gpu.fitting_repeats(20, 0.5, budget) == 0
    assert gpu.fitting_repeats(5, 0.0, budget) == 5


def test_compare_flags_a_wrong_gradient():
    want = {"out": torch.ones(4, dtype=torch.float64), "du": torch.zeros(4, dtype=torch.float64)}
    good = {"out": torch.ones(4) + 1e-4, "du": torch.zeros(4)}
    assert gpu.compare(good, want, rtol=1e-3, atol=1e-3)["passed"]
    bad = good | {"du": torch.tensor([0.0, 0.0, 0.01, 0.0])}
    res = gpu.compare(bad, want, rtol=1e-3, atol=1e-3)
    assert not res["passed"] and res["tensors"]["du"]["worst_ratio"] == pytest.approx(10, rel=1e-3)
    assert not gpu.compare(good | {"du": torch.tensor([float("nan")] * 4)}, want, 1e-3, 1e-3)["passed"]


@pytest.mark.parametrize(("override", "key"), [
    ("train.encoders=[gru]", "train.encoders"),
    ("correctness.groups=3", "correctness.groups"),
    ("train.precision=fp8", "train.precision"),
    ("scan.cases=[{length:0,batch:1}]", r"scan.cases\[0\].length"),
    ("max_total_s=0", "max_total_s"),
])
def test_bad_config_names_the_key(tmp_path, override, key):
    with pytest.raises(RecsysError, match=key):
        gpu.validate_config(_cfg(tmp_path, override))
