"""`python -m recsys_mamba.bench scan`: forward and forward+backward tokens/s of every selective-scan
backend, side by side in one run, against mambapy's parallel scan and the machine's elementwise ceiling.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import DictConfig

from recsys_mamba import checks
from recsys_mamba.bench._harness import machine, median_seconds, write_result
from recsys_mamba.config import hydra_entry
from recsys_mamba.errors import RecsysError
from recsys_mamba.ops import selective_scan
from recsys_mamba.schema import Check, Int, IntList, PathTo, Rule, Schema, Seed, Subset

BACKENDS = ("cpu", "ref", "mambapy", "ceiling", "triton", "mamba_ssm")


def _inputs(batch: int, dim: int, length: int, d_state: int, device: torch.device) -> dict:
    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device)

    return {
        "u": r(batch, dim, length),
        "delta": r(batch, dim, length) * 0.5,
        "A": -torch.rand(dim, d_state, device=device),
        "B": r(batch, d_state, length),
        "C": r(batch, d_state, length),
        "D": r(dim),
        "z": r(batch, dim, length),
        "delta_bias": r(dim),
    }


def _ops_runner(backend: str) -> Callable[[dict], torch.Tensor]:
    return lambda x: selective_scan(**x, delta_softplus=True, backend=backend)


def _mambapy_runner() -> Callable[[dict], torch.Tensor] | None:
    try:
        from mambapy.pscan import pscan
    except ImportError:
        return None

    def run(x: dict) -> torch.Tensor:
        # mambapy's MambaBlock.selective_scan, in its (batch, length, dim) layout.
        u = x["u"].transpose(1, 2)
        delta = torch.nn.functional.softplus(x["delta"] + x["delta_bias"][:, None]).transpose(1, 2)
        B, C = x["B"].transpose(1, 2), x["C"].transpose(1, 2)
        deltaA = torch.exp(delta.unsqueeze(-1) * x["A"])
        BX = delta.unsqueeze(-1) * B.unsqueeze(2) * u.unsqueeze(-1)
        hs = pscan(deltaA, BX)
        y = (hs @ C.unsqueeze(-1)).squeeze(3) + x["D"] * u
        return (y * torch.nn.functional.silu(x["z"].transpose(1, 2))).transpose(1, 2)

    return run


def _mamba_ssm_runner() -> Callable[[dict], torch.Tensor] | None:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return lambda x: selective_scan_fn(**x, delta_softplus=True)


def _ceiling_seconds(batch: int, dim: int, length: int, d_state: int, repeats: int,
                     device: torch.device) -> float:
    """exp + multiply-add over batch*dim*length*d_state state elements, in cache-sized slabs."""
    slab = batch * dim * d_state * max(1, min(length, (1 << 20) // (batch * dim * d_state)))
    x, h, b, a = (torch.randn(slab, device=device) for _ in range(4))
    passes = max(1, round(batch * dim * length * d_state / slab))

    def run() -> None:
        for _ in range(passes):
            torch.exp(x, out=a)
            torch.addcmul(b, a, h, out=h)

    return median_seconds(run, repeats, device=device) * batch * dim * length * d_state / (slab * passes)


def _time_backend(run: Callable[[dict], torch.Tensor], x: dict, repeats: int,
                  device: torch.device) -> tuple[float, float]:
    with torch.no_grad():
        fwd = median_seconds(lambda: run(x), repeats, device=device)
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}

    def fwd_bwd() -> None:
        run(leaves).sum().backward()

    return fwd, median_seconds(fwd_bwd, repeats, device=device)


def benchmark(cfg: DictConfig) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    backends = list(cfg.backends) + (["triton", "mamba_ssm"] if device.type == "cuda" else [])
    runners = {"cpu": _ops_runner("cpu"), "ref": _ops_runner("ref"), "triton": _ops_runner("triton"),
               "mambapy": _mambapy_runner(), "mamba_ssm": _mamba_ssm_runner()}
    rows = []
    for d_state in cfg.d_states:
        for case in cfg.cases:
            length, batch = int(case.length), int(case.batch)
            for name in backends:
                row = {"backend": name, "length": length, "batch": batch, "dim": cfg.dim, "d_state": d_state}
                if name == "ceiling":
                    sec = _ceiling_seconds(batch, cfg.dim, length, d_state, cfg.repeats, device)
                    rows.append(row | {"fwd_tok_s": batch * length / sec, "fwd_bwd_tok_s": None})
                    continue
                run = runners.get(name)
                if run is None:
                    rows.append(row | {"note": "not installed"})
                    continue
                if name == "ref" and length > cfg.ref_max_length:
                    rows.append(row | {"note": f"skipped: length > ref_max_length={cfg.ref_max_length}"})
                    continue
                b = min(batch, cfg.ref_max_batch) if name == "ref" else batch
                x = _inputs(b, cfg.dim, length, d_state, device)
                fwd, fwd_bwd = _time_backend(run, x, cfg.repeats, device)
                rows.append(row | {"batch": b, "fwd_tok_s": b * length / fwd,
                                   "fwd_bwd_tok_s": b * length / fwd_bwd})
                print(f"  {name:9s} L={length:5d} N={d_state}: fwd {fwd * 1e3:8.1f} ms, "
                      f"fwd+bwd {fwd_bwd * 1e3:8.1f} ms", flush=True)
    return rows


def markdown_table(rows: list[dict]) -> str:
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:,.0f}"

    ref = {(r["length"], r["d_state"]): r for r in rows if r["backend"] == "mambapy" and "fwd_tok_s" in r}
    ceil = {(r["length"], r["d_state"]): r for r in rows if r["backend"] == "ceiling"}
    lines = ["| d_state | L | batch | backend | fwd tok/s | fwd+bwd tok/s | fwd+bwd vs mambapy "
             "| ceiling / fwd |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = (r["length"], r["d_state"])
        if "fwd_tok_s" not in r:
            lines.append(f"| {r['d_state']} | {r['length']} | {r['batch']} | {r['backend']} | "
                         f"{r['note']} | | | |")
            continue
        vs_mp = (f"{r['fwd_bwd_tok_s'] / ref[key]['fwd_bwd_tok_s']:.1f}x"
                 if key in ref and r["fwd_bwd_tok_s"] else "")
        vs_ceil = f"{ceil[key]['fwd_tok_s'] / r['fwd_tok_s']:.2f}" if key in ceil else ""
        lines.append(f"| {r['d_state']} | {r['length']} | {r['batch']} | {r['backend']} | "
                     f"{fmt(r['fwd_tok_s'])} | {fmt(r['fwd_bwd_tok_s'])} | {vs_mp} | {vs_ceil} |")
    return "\n".join(lines)


def _cases(cfg: DictConfig) -> None:
    cases = checks.select(cfg, "cases", None)
    if not isinstance(cases, list) or not cases:
        raise RecsysError(f"cases={cases!r} must be a list like [{{length: 200, batch: 64}}]")
    for i, case in enumerate(cases):
        if not isinstance(case, dict) or set(case) != {"length", "batch"}:
            raise RecsysError(f"cases[{i}]={case!r} must be {{length: L, batch: B}}")
        checks.integer(case["length"], f"cases[{i}].length", minimum=1, maximum=1 << 24)
        checks.integer(case["batch"], f"cases[{i}].batch", minimum=1, maximum=1 << 20)


# Every value of conf/bench_scan.yaml, before any tensor is allocated.
BENCH_SCAN = Schema(
    Rule("seed", Seed()),
    Rule("dim", Int(1, 1 << 16, example=128)),
    Rule("d_states", IntList(1, 1024, example="[16,32]")),
    Check(_cases),
    Rule("backends", Subset(BACKENDS)),
    Rule("repeats", Int(1, 1000, example=3)),
    Rule("ref_max_batch", Int(1, example=8)),
    Rule("ref_max_length", Int(1, example=4096)),
    Rule("threads", Int(1, 4096, optional=True)),
    Rule("output_json", PathTo("out_file")),
)


def validate_config(cfg: DictConfig) -> None:
    BENCH_SCAN.validate(cfg)


@hydra_entry("bench_scan")
def main(cfg: DictConfig) -> list[dict]:
    validate_config(cfg)
    rows = benchmark(cfg)
    path = write_result(cfg.output_json, {"machine": machine(), "rows": rows})
    print(markdown_table(rows))
    print(f"results: {path}")
    return rows
