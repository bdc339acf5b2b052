"""`python -m recsys_mamba.bench gpu`: the checks and timings that need a CUDA GPU, in one bounded run.

Made for a session with a GPU lent for a few minutes: one command, one JSON, rewritten after every
section so that a run cut short still leaves what it measured. Sections, in order:

1. compile: every Triton variant for this GPU's compute capability, in parallel processes
   (`ops.triton_aot`), which fills Triton's cache so the launches below load binaries instead of JIT
   compiling one at a time.
2. correctness: `selective_scan(backend="triton")` forward and backward on CUDA against `ops.ref` in
   float64 on the same (dtype-rounded) inputs, for every launch config's smallest and largest d_state
   (so every BLOCK_N, i.e. every kernel variant of the dtype) with all optional inputs, with none, and
   with grouped B/C (once more under torch.use_deterministic_algorithms, where the backward stores
   dB/dC partial sums instead of adding them with atomics); fp32 and bf16 by default. Each tensor
   passes when every element is within atol + rtol * |want|.
3. scan: forward (no grad) and forward + backward medians of backend="triton" beside mamba-ssm's
   `selective_scan_fn` when it imports, else beside `ref` (up to `ref_max_length`).
4. train: one training step (encode + mean(hidden^2) + backward, as `bench encoders`) of each encoder
   under autocast (bf16-mixed by default) at each L, the encoders interleaved repeat by repeat.

Time is bounded by construction: no section or case starts after its budget (or `max_total_s`) is spent,
and a case's timed repeats shrink to what its last warm-up call says will fit. Without CUDA the command
refuses (`error:` and exit status 2); the sections themselves take a device and a backend, which is how
the tests run them on CPU.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from recsys_mamba import checks
from recsys_mamba.bench._harness import seconds, write_result
from recsys_mamba.config import hydra_entry
from recsys_mamba.errors import RecsysError
from recsys_mamba.schema import (
    Bool,
    Check,
    Choice,
    Int,
    IntList,
    Num,
    PathTo,
    Relation,
    Rule,
    Schema,
    Seed,
    Subset,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "32": None}
OPTIONAL = ("D", "z", "delta_bias", "initial_state")


class Budget:
    """Seconds left to a section, also capped by the whole run's deadline."""

    def __init__(self, seconds: float, run_deadline: float) -> None:
        self.deadline = min(time.monotonic() + seconds, run_deadline)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def spent(self) -> bool:
        return self.left() <= 0


def fitting_repeats(wanted: int, last_warmup_s: float, budget: Budget, calls_per_repeat: int = 1) -> int:
    """How many timed repeats fit what is left of the budget, judging by the last warm-up call."""
    if last_warmup_s <= 0:
        return wanted
    return max(0, min(wanted, int(budget.left() / (last_warmup_s * calls_per_repeat))))


# ---- 1. compile -------------------------------------------------------------------------------------


def compile_section(cfg: DictConfig, arch: int, budget: Budget) -> dict:
    from recsys_mamba.ops import triton_aot

    variants = triton_aot.launch_variants()
    start = time.perf_counter()
    results = triton_aot.compile_all(variants, (arch,), cfg.compile.workers, deadline=budget.deadline)
    failed = [f"{r.variant.label}: {r.error}" for r in results if isinstance(r, triton_aot.Failure)]
    spilled = [
        r.variant.label
        for r in results
        if not isinstance(r, triton_aot.Failure) and (r.usage.spill_stores or r.usage.spill_loads)
    ]
    return {
        "arch": arch,
        "variants": len(variants),
        "compiled": len(results) - len(failed),
        "failed": failed,
        "spilled": spilled,
        "not_reached": len(variants) - len(results),
        "seconds": time.perf_counter() - start,
    }


# ---- 2. correctness ---------------------------------------------------------------------------------


def _scan_inputs(
    batch: int,
    dim: int,
    length: int,
    d_state: int,
    groups: int,
    present: tuple[str, ...],
    generator: torch.Generator,
    softplus: bool = True,
) -> dict[str, torch.Tensor]:
    """fp32 CPU inputs in MambaMixer's ranges: delta a softplus input around -1 (already through a
    softplus when the scan applies none, so the step stays positive), A in -(0.5..N + 0.5)."""

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    bc = (batch, d_state, length) if groups == 0 else (batch, groups, d_state, length)
    delta = r(batch, dim, length) * 0.5 - 1.0
    x = {
        "u": r(batch, dim, length),
        "delta": delta if softplus else torch.nn.functional.softplus(delta),
        "A": -(torch.rand(dim, d_state, generator=generator) * d_state + 0.5),
        "B": r(*bc),
        "C": r(*bc),
    }
    extras = {
        "D": r(dim),
        "z": r(batch, dim, length),
        "delta_bias": r(dim) * 0.5,
        "initial_state": r(batch, dim, d_state),
    }
    return x | {k: v for k, v in extras.items() if k in present}


def _run_scan(x: dict[str, torch.Tensor], backend: str, softplus: bool) -> dict[str, torch.Tensor]:
    """Forward + backward through a fixed weighted loss on out and last_state; values and grads."""
    from recsys_mamba.ops import selective_scan

    leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    out, last = selective_scan(**leaves, delta_softplus=softplus, return_last_state=True, backend=backend)
    w = torch.sin(torch.arange(out.numel(), device=out.device, dtype=torch.float64)).view_as(out)
    loss = (out.double() * w).sum() + last.double().sum()
    loss.backward()
    return {"out": out.detach(), "last": last.detach()} | {f"d{k}": v.grad for k, v in leaves.items()}


def compare(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float, atol: float
) -> dict[str, Any]:
    """Worst element of each tensor: max |got - want| and max |got - want| / (atol + rtol |want|)."""
    worst: dict[str, Any] = {}
    for name, w in want.items():
        g = got[name]
        if g is None or w is None:
            worst[name] = {"error": "missing"}
            continue
        diff = (g.double() - w.double()).abs()
        scale = atol + rtol * w.double().abs()
        worst[name] = {
            "max_abs": diff.max().item(),
            "worst_ratio": (diff / scale).max().item(),
            "finite": bool(torch.isfinite(g.double()).all()),
        }
    ok = all("error" not in v and v["finite"] and v["worst_ratio"] <= 1.0 for v in worst.values())
    return {"passed": ok, "tensors": worst}


@contextlib.contextmanager
def _deterministic(on: bool) -> Iterator[None]:
    """torch's deterministic mode on or off for the block (warn_only: only the scan's choice matters)."""
    before = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(on, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)


def correctness_section(cfg: DictConfig, device: torch.device, backend: str, budget: Budget) -> dict:
    from recsys_mamba.ops.triton_aot import d_state_representatives

    c = cfg.correctness
    d_states = list(c.d_states) if c.d_states is not None else d_state_representatives()
    gen = torch.Generator().manual_seed(int(cfg.seed))
    cases = []
    for dtype_name in c.dtypes:
        for n in d_states:
            cases.append((dtype_name, n, 0, OPTIONAL, True, False))
            cases.append((dtype_name, n, 0, (), False, False))
        for deterministic in (False, True):
            cases.append((dtype_name, 16, int(c.groups), OPTIONAL, True, deterministic))
    rows, skipped = [], []
    for dtype_name, n, groups, present, softplus, deterministic in cases:
        case = {
            "dtype": dtype_name,
            "d_state": n,
            "groups": groups,
            "optional": list(present),
            "softplus": softplus,
            "deterministic": deterministic,
        }
        if budget.spent():
            skipped.append(case)
            continue
        dtype = DTYPES[dtype_name]
        x = _scan_inputs(int(c.batch), int(c.dim), int(c.length), n, groups, present, gen, softplus)
        # Activations rounded to the dtype; A, D, delta_bias and the state stay fp32 (as MambaMixer).
        lo = {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v).to(device) for k, v in x.items()}
        start = time.perf_counter()
        want = _run_scan({k: v.double() for k, v in lo.items()}, "ref", softplus)
        with _deterministic(deterministic):
            got = _run_scan(lo, backend, softplus)
        tol = c.tolerances[dtype_name]
        rows.append(
            case
            | compare(got, want, float(tol.rtol), float(tol.atol))
            | {"seconds": time.perf_counter() - start}
        )
    return {
        "backend": backend,
        "rows": rows,
        "passed": sum(r["passed"] for r in rows),
        "failed": sum(not r["passed"] for r in rows),
        "skipped": skipped,
    }


# ---- 3. scan timing -----------------------------------------------------------------------------------


def _mamba_ssm() -> tuple[Callable | None, str | None]:
    try:
        import mamba_ssm
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None, None
    return selective_scan_fn, getattr(mamba_ssm, "__version__", "unknown")


def _ours(backend: str) -> Callable[..., torch.Tensor]:
    from recsys_mamba.ops import selective_scan

    return lambda **x: selective_scan(**x, delta_softplus=True, backend=backend)


def _time_calls(
    fn: Callable[[], object], cfg_scan: DictConfig, budget: Budget, device: torch.device
) -> dict[str, Any]:
    warm = [seconds(fn, device) for _ in range(int(cfg_scan.warmup))]
    n = fitting_repeats(int(cfg_scan.repeats), warm[-1] if warm else 0.0, budget)
    times = [seconds(fn, device) for _ in range(n)]
    return {"median_s": statistics.median(times) if times else None, "repeats": n, "warmup_s": warm}


def scan_section(cfg: DictConfig, device: torch.device, backend: str, budget: Budget) -> dict:
    s = cfg.scan
    baseline_fn, version = _mamba_ssm()
    baseline = "mamba_ssm" if baseline_fn is not None else "ref"
    theirs = (lambda **x: baseline_fn(**x, delta_softplus=True)) if baseline_fn is not None else _ours("ref")
    runners = {backend: _ours(backend), baseline: theirs}
    gen = torch.Generator().manual_seed(int(cfg.seed))
    rows, skipped = [], []
    for dtype_name in s.dtypes:
        for case in s.cases:
            length, batch = int(case.length), int(case.batch)
            x = _scan_inputs(batch, int(s.dim), length, int(s.d_state), 0, ("D", "z", "delta_bias"), gen)
            lo = {
                k: (v.to(DTYPES[dtype_name]) if k in ("u", "delta", "B", "C", "z") else v).to(device)
                for k, v in x.items()
            }
            for name, run in runners.items():
                row = {
                    "backend": name,
                    "dtype": dtype_name,
                    "length": length,
                    "batch": batch,
                    "dim": int(s.dim),
                    "d_state": int(s.d_state),
                }
                if name == "ref" and length > int(s.ref_max_length):
                    skipped.append(row | {"reason": f"length > ref_max_length={s.ref_max_length}"})
                    continue
                if budget.spent():
                    skipped.append(row | {"reason": "scan.budget_s or max_total_s spent"})
                    continue
                with torch.no_grad():
                    fwd = _time_calls(lambda run=run, lo=lo: run(**lo), s, budget, device)
                leaves = {k: v.clone().requires_grad_() for k, v in lo.items()}

                def fwd_bwd(run: Callable = run, leaves: dict = leaves) -> None:
                    run(**leaves).float().sum().backward()

                both = _time_calls(fwd_bwd, s, budget, device)
                tokens = batch * length
                row |= {
                    "fwd": fwd,
                    "fwd_bwd": both,
                    "fwd_tok_s": tokens / fwd["median_s"] if fwd["median_s"] else None,
                    "fwd_bwd_tok_s": tokens / both["median_s"] if both["median_s"] else None,
                }
                rows.append(row)
    for row in rows:  # side by side: our backend's time over the baseline's at the same case
        if row["backend"] != backend:
            continue
        base = next(
            (
                r
                for r in rows
                if r["backend"] == baseline and all(r[k] == row[k] for k in ("dtype", "length", "batch"))
            ),
            None,
        )
        for key in ("fwd", "fwd_bwd"):
            ours, theirs = row[key]["median_s"], base[key]["median_s"] if base else None
            row[f"{key}_vs_{baseline}"] = ours / theirs if ours and theirs else None
    return {
        "backend": backend,
        "baseline": baseline,
        "mamba_ssm_version": version,
        "rows": rows,
        "skipped": skipped,
    }


# ---- 4. training step --------------------------------------------------------------------------------


def train_section(cfg: DictConfig, device: torch.device, budget: Budget) -> dict:
    from recsys_mamba.bench.encoders import build_model

    t = cfg.train
    amp = PRECISIONS[str(t.precision)]
    models_conf = OmegaConf.to_container(cfg.models, resolve=True)
    rows, skipped = [], []
    for length in t.lengths:
        length = int(length)
        batch = max(1, int(t.tokens_per_batch) // length)
        if budget.spent():
            skipped += [
                {"encoder": e, "length": length, "reason": "train.budget_s or max_total_s spent"}
                for e in t.encoders
            ]
            continue
        torch.manual_seed(int(cfg.seed))
        items = torch.randint(1, int(t.n_items) + 1, (batch, length), device=device)
        models = {
            e: build_model(models_conf[e], int(t.n_items), int(t.d_model), int(t.n_layers), length)
            .to(device)
            .train()
            for e in t.encoders
        }

        def step(model: torch.nn.Module, items: torch.Tensor = items) -> None:
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                hidden = model.encode({"items": items})
            hidden.float().square().mean().backward()

        try:
            warm = {
                e: [seconds(lambda m=m: step(m), device) for _ in range(int(t.warmup))]
                for e, m in models.items()
            }
            last = sum(w[-1] for w in warm.values() if w)
            n = fitting_repeats(int(t.repeats), last, budget)
            times: dict[str, list[float]] = {e: [] for e in models}
            for _ in range(n):
                for e, m in models.items():  # interleaved: machine noise falls on every encoder alike
                    times[e].append(seconds(lambda m=m: step(m), device))
        except torch.cuda.OutOfMemoryError as err:
            skipped += [{"encoder": e, "length": length, "reason": f"out of memory: {err}"} for e in models]
            del models
            torch.cuda.empty_cache()
            continue
        for e in models:
            med = statistics.median(times[e]) if times[e] else None
            rows.append(
                {
                    "encoder": e,
                    "length": length,
                    "batch": batch,
                    "precision": str(t.precision),
                    "repeats": n,
                    "warmup_s": warm[e],
                    "median_s": med,
                    "train_tok_s": batch * length / med if med else None,
                }
            )
        del models
    ratios = []
    first, second = [*list(t.encoders), None, None][:2]
    for length in t.lengths:
        a = next((r for r in rows if r["encoder"] == first and r["length"] == int(length)), None)
        b = next((r for r in rows if r["encoder"] == second and r["length"] == int(length)), None)
        if a and b and a["median_s"] and b["median_s"]:
            ratios.append(
                {"length": int(length), f"{first}_over_{second}_tok_s": b["median_s"] / a["median_s"]}
            )
    return {"precision": str(t.precision), "rows": rows, "ratios": ratios, "skipped": skipped}


# ---- the run ------------------------------------------------------------------------------------------


def _correctness(cfg: DictConfig) -> None:
    for name in checks.select(cfg, "correctness.dtypes", None):
        for key in ("rtol", "atol"):
            tol_key = f"correctness.tolerances.{name}.{key}"
            checks.number(checks.select(cfg, tol_key, None), tol_key, above=0, example=1e-3)


def _scan_cases(cfg: DictConfig) -> None:
    cases = checks.select(cfg, "scan.cases", None)
    if not isinstance(cases, list) or not cases:
        raise RecsysError(f"scan.cases={cases!r} must be a list like [{{length: 200, batch: 64}}]")
    for i, case in enumerate(cases):
        if not isinstance(case, dict) or set(case) != {"length", "batch"}:
            raise RecsysError(f"scan.cases[{i}]={case!r} must be {{length: L, batch: B}}")
        checks.integer(case["length"], f"scan.cases[{i}].length", minimum=1, maximum=1 << 24)
        checks.integer(case["batch"], f"scan.cases[{i}].batch", minimum=1, maximum=1 << 20)


def _encoders(cfg: DictConfig) -> None:
    models = checks.select(cfg, "models", None) or {}
    checks.subset(checks.select(cfg, "train.encoders", None), "train.encoders", list(models))


# Every value of conf/bench_gpu.yaml, before CUDA is touched.
BENCH_GPU = Schema(
    Rule("seed", Seed()),
    Rule("max_total_s", Num(above=0, maximum=3600, example=540)),
    Rule("compile.enabled", Bool()),
    Rule("compile.workers", Int(1, 256, optional=True)),
    [
        Rule(f"{section}.budget_s", Num(minimum=0, example=60))
        for section in ("compile", "correctness", "scan", "train")
    ],
    Rule("correctness.dtypes", Subset(tuple(DTYPES))),
    Rule("correctness.d_states", IntList(1, 256, example="[16,64]", optional=True)),
    [Rule(f"correctness.{key}", Int(1, 1 << 16, example=8)) for key in ("batch", "dim", "length")],
    Rule("correctness.groups", Int(1, example=4)),
    Relation(
        ("correctness.dim", "correctness.groups"), lambda d, g: d % g == 0, "{k1}={v1} must divide {k0}={v0}"
    ),
    Check(_correctness),
    Rule("scan.dim", Int(1, 1 << 16, example=128)),
    Rule("scan.d_state", Int(1, 256, example=16)),
    Rule("scan.dtypes", Subset(tuple(DTYPES))),
    Check(_scan_cases),
    [Rule(f"{section}.repeats", Int(1, 1000, example=10)) for section in ("scan", "train")],
    [Rule(f"{section}.warmup", Int(1, 100, example=2)) for section in ("scan", "train")],
    Rule("scan.ref_max_length", Int(1, example=1000)),
    Check(_encoders),
    Rule("train.lengths", IntList(1, 1 << 20, example="[200,1000,4000]")),
    [
        Rule(f"train.{key}", Int(1, example=64))
        for key in ("tokens_per_batch", "d_model", "n_layers", "n_items")
    ],
    Rule("train.precision", Choice(tuple(PRECISIONS))),
    Rule("output_json", PathTo("out_file")),
)


def validate_config(cfg: DictConfig) -> None:
    BENCH_GPU.validate(cfg)


def require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise RecsysError(
            f"bench gpu needs a CUDA GPU and this machine has none (torch {torch.__version__}, "
            f"torch.cuda.is_available() is False); run it where a GPU is lent, or use "
            "`python -m recsys_mamba.bench triton` to compile the kernels without one"
        )
    return torch.device("cuda")


def run(
    cfg: DictConfig,
    device: torch.device,
    backend: str = "triton",
    write: Callable[[dict], None] | None = None,
) -> dict:
    """All sections on `device` with the scan `backend`; `write(result)` after each one."""
    started = time.monotonic()
    run_deadline = started + float(cfg.max_total_s)
    cuda = device.type == "cuda"
    result: dict[str, Any] = {
        "benchmark": "gpu",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
        },
        "triton": __import__("triton").__version__,
        "budgets_s": {
            "max_total_s": float(cfg.max_total_s),
            **{k: float(cfg[k].budget_s) for k in ("compile", "correctness", "scan", "train")},
        },
        "sections": {},
    }

    def done(name: str, section: dict) -> None:
        result["sections"][name] = section
        result["wall_s"] = time.monotonic() - started
        if write is not None:
            write(result)

    if cfg.compile.enabled and cuda:
        major, minor = torch.cuda.get_device_capability(device)
        budget = Budget(cfg.compile.budget_s, run_deadline)
        done("compile", compile_section(cfg, 10 * major + minor, budget))
    done(
        "correctness",
        correctness_section(cfg, device, backend, Budget(cfg.correctness.budget_s, run_deadline)),
    )
    done("scan", scan_section(cfg, device, backend, Budget(cfg.scan.budget_s, run_deadline)))
    done("train", train_section(cfg, device, Budget(cfg.train.budget_s, run_deadline)))
    return result


def summary(result: dict) -> str:
    s = result["sections"]
    lines = [f"device: {result['machine']['device']}  wall {result.get('wall_s', 0):.0f} s"]
    if "compile" in s:
        c = s["compile"]
        lines.append(
            f"compile sm_{c['arch']}: {c['compiled']}/{c['variants']} in {c['seconds']:.0f} s, "
            f"failed {len(c['failed'])}, spilled {len(c['spilled'])}, "
            f"not reached {c['not_reached']}"
        )
    c = s["correctness"]
    lines.append(
        f"correctness vs float64 ref: {c['passed']} passed, {c['failed']} failed, {len(c['skipped'])} skipped"
    )
    for r in c["rows"]:
        if not r["passed"]:
            bad = {
                k: v for k, v in r["tensors"].items() if v.get("worst_ratio", 2) > 1 or not v.get("finite")
            }
            det = " deterministic" if r["deterministic"] else ""
            lines.append(f"  FAIL {r['dtype']} d_state={r['d_state']} groups={r['groups']}{det}: {bad}")
    sc = s["scan"]
    lines.append(
        f"| scan | dtype | L | batch | fwd ms | fwd+bwd ms | fwd vs {sc['baseline']} | "
        f"fwd+bwd vs {sc['baseline']} |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in sc["rows"]:

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v * 1e3:.3f}"

        def x(v: float | None) -> str:
            return "" if v is None else f"{v:.2f}x"

        lines.append(
            f"| {r['backend']} | {r['dtype']} | {r['length']} | {r['batch']} "
            f"| {ms(r['fwd']['median_s'])} | {ms(r['fwd_bwd']['median_s'])} "
            f"| {x(r.get('fwd_vs_' + sc['baseline']))} "
            f"| {x(r.get('fwd_bwd_vs_' + sc['baseline']))} |"
        )
    tr = s["train"]
    lines.append(f"| train ({tr['precision']}) | L | batch | step ms | tokens/s |")
    lines.append("|---|---|---|---|---|")
    for r in tr["rows"]:
        step = "-" if r["median_s"] is None else f"{r['median_s'] * 1e3:.1f}"
        tok = "-" if r["train_tok_s"] is None else f"{r['train_tok_s']:,.0f}"
        lines.append(f"| {r['encoder']} | {r['length']} | {r['batch']} | {step} | {tok} |")
    for r in tr["ratios"]:
        pairs = ", ".join(f"{k} = {v:.2f}" for k, v in r.items() if k != "length")
        lines.append(f"  L={r['length']}: {pairs}")
    skipped = sum(len(s[k].get("skipped", [])) for k in s)
    if skipped:
        lines.append(f"skipped (budget or limits): {skipped}; see the JSON")
    return "\n".join(lines)


@hydra_entry("bench_gpu")
def main(cfg: DictConfig) -> dict:
    validate_config(cfg)
    device = require_cuda()
    path = Path(cfg.output_json)
    result = run(cfg, device, write=lambda r: write_result(path, r))
    print(summary(result))
    print(f"results: {path}")
    return result
