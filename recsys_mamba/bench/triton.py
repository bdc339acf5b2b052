"""`python -m recsys_mamba.bench triton`: the Triton kernels compiled for real GPUs on any machine.

Every variant the launch code can pick (`ops.triton_aot.launch_variants`: kernel x activation dtype x
BLOCK_N) is compiled for each of `archs` with Triton's bundled ptxas; no GPU or CUDA driver is needed.
Per variant and target: registers per thread, spill stores / loads and stack bytes from ptxas -v on the
generated PTX, and shared memory from Triton's metadata.

Beside them, a memory roofline for one launch (`roofline`): the bytes each kernel moves per token
(`ops.triton_traffic`, a count checked against the interpreter's loads, stores and atomics), an estimated DRAM
share, and the bandwidth bound (each input read once, each output written once), turned into times at
H100 SXM's 3.35 TB/s. Those times are estimates from byte counts, not measurements, and count memory only.
"""

from __future__ import annotations

import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from recsys_mamba import checks
from recsys_mamba.bench._harness import write_result
from recsys_mamba.config import hydra_entry
from recsys_mamba.errors import RecsysError
from recsys_mamba.schema import Bool, Check, Int, Num, PathTo, Relation, Rule, Schema, Subset

ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")
OPTIONAL = ("D", "z", "delta_bias", "initial_state")
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def _block_ns(cfg: DictConfig) -> None:
    from recsys_mamba.ops.triton_scan import MAX_D_STATE

    block_ns = checks.select(cfg, "block_ns", None)
    if block_ns is not None:
        powers = [1 << i for i in range(1, MAX_D_STATE.bit_length())]
        if not isinstance(block_ns, list) or not block_ns or any(b not in powers for b in block_ns):
            raise RecsysError(f"block_ns={block_ns!r} must be null or a non-empty list drawn from {powers}")


def _optional(cfg: DictConfig) -> None:
    optional = checks.select(cfg, "roofline.optional", None)
    if optional != [] and optional is not None:
        checks.subset(optional, "roofline.optional", OPTIONAL)


# Every value of conf/bench_triton.yaml, before anything is compiled.
BENCH_TRITON = Schema(
    Rule("archs", Subset(ARCHS)),
    Rule("dtypes", Subset(DTYPES)),
    Check(_block_ns),
    Rule("workers", Int(1, 256, optional=True)),
    Rule("roofline.batch", Int(1, 1 << 20, example=64)),
    Rule("roofline.dim", Int(1, 1 << 16, example=128)),
    Rule("roofline.length", Int(1, 1 << 24, example=200)),
    Rule("roofline.groups", Int(1, example=1)),
    Relation(("roofline.dim", "roofline.groups"), lambda d, g: d % g == 0, "{k1}={v1} must divide {k0}={v0}"),
    Check(_optional),
    Rule("roofline.softplus", Bool()),
    Rule("roofline.deterministic", Bool()),
    Rule("goal_ratio", Num(minimum=1.0, example=1.5)),
    Rule("output_json", PathTo("out_file")),
)


def validate_config(cfg: DictConfig) -> None:
    BENCH_TRITON.validate(cfg)


def _ptxas_versions(archs: list[int]) -> dict[str, str]:
    from triton.backends.nvidia.compiler import get_ptxas

    out = {}
    for arch in archs:
        tool = get_ptxas(arch)
        out[f"sm_{arch}"] = f"{Path(tool.path).name} {tool.version.strip().splitlines()[-1]}"
    return out


def _roofline_row(variant: Any, cfg: DictConfig) -> dict:
    from recsys_mamba.ops.triton_traffic import Flags, ScanShape, roofline

    rf = cfg.roofline
    present = set(rf.optional or [])
    flags = Flags(
        D="D" in present,
        z="z" in present,
        delta_bias="delta_bias" in present,
        initial_state="initial_state" in present,
        dlast=True,
        softplus=bool(rf.softplus),
        deterministic=bool(rf.deterministic),
    )
    block_n = variant.constexpr("BLOCK_N")
    shape = ScanShape(int(rf.batch), int(rf.dim), int(rf.length), block_n, int(rf.groups))
    r = roofline(variant.short, shape, DTYPE_BYTES[variant.dtype], flags)
    return {
        "d_state": block_n,
        "issued_bytes_per_token": r.issued_per_token,
        "dram_bytes_per_token_estimate": r.dram_per_token,
        "compulsory_bytes_per_token": r.compulsory_per_token,
        "estimate_us": r.estimate_us,
        "bound_us": r.bound_us,
        "ratio": r.ratio,
    }


def benchmark(cfg: DictConfig) -> dict:
    from recsys_mamba.ops import triton_aot
    from recsys_mamba.ops.triton_traffic import H100_SXM_BANDWIDTH

    archs = [int(a) for a in cfg.archs]
    block_ns = None if cfg.block_ns is None else {int(b) for b in cfg.block_ns}
    variants = tuple(
        v
        for v in triton_aot.launch_variants()
        if v.dtype in cfg.dtypes and (block_ns is None or v.constexpr("BLOCK_N") in block_ns)
    )
    start = time.perf_counter()
    results = triton_aot.compile_all(variants, tuple(archs), cfg.workers)
    compile_s = time.perf_counter() - start
    by_key = {(r.variant, r.arch): r for r in results}
    rows = []
    for v in variants:
        row: dict[str, Any] = {
            "kernel": v.short,
            "dtype": v.dtype,
            "BLOCK_D": v.constexpr("BLOCK_D"),
            "BLOCK_N": v.constexpr("BLOCK_N"),
            "K": v.constexpr("K"),
            "num_warps": v.num_warps,
            "targets": {},
        }
        for arch in archs:
            r = by_key[(v, arch)]
            if isinstance(r, triton_aot.Failure):
                row["targets"][f"sm_{arch}"] = {"error": r.error}
                continue
            row["targets"][f"sm_{arch}"] = {
                "registers": r.usage.registers,
                "spill_stores": r.usage.spill_stores,
                "spill_loads": r.usage.spill_loads,
                "stack": r.usage.stack,
                "shared": r.shared,
                "cubin_bytes": r.cubin_bytes,
                "from_cache": r.cached,
            }
        row["roofline"] = _roofline_row(v, cfg)
        rows.append(row)
    targets = [t for row in rows for t in row["targets"].values()]
    failed = [
        f"{r['kernel']} {r['dtype']} N={r['BLOCK_N']} {k}"
        for r in rows
        for k, t in r["targets"].items()
        if "error" in t
    ]
    spilled = [
        f"{r['kernel']} {r['dtype']} N={r['BLOCK_N']} {k}"
        for r in rows
        for k, t in r["targets"].items()
        if t.get("spill_stores") or t.get("spill_loads")
    ]
    over = [
        f"{r['kernel']} {r['dtype']} N={r['BLOCK_N']}: {r['roofline']['ratio']:.2f}x"
        for r in rows
        if r["roofline"]["ratio"] > cfg.goal_ratio
    ]
    return {
        "benchmark": "triton",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "triton": __import__("triton").__version__,
        "ptxas": _ptxas_versions(archs),
        "compile_s": compile_s,
        "compiled_now": sum(1 for t in targets if t.get("from_cache") is False),
        "method": {
            "compile": "triton.compile(ASTSource(kernel, signature, constexprs, attrs), "
            "target=GPUTarget('cuda', arch, 32)) with the signature Triton's binder gives the "
            "recorded launch; registers, spills and stack from ptxas -v (Triton's own run), "
            "shared memory from Triton's metadata",
            "roofline": "ESTIMATE, not a measurement: bytes per token from ops.triton_traffic (per-argument "
            "counts checked against the interpreter's loads, stores and atomics; an atomic add counts "
            "as a read and a write), plus the zero fill of dB/dC the atomics add into; DRAM estimate = "
            "issued less what an L2 serves (B/C re-read per channel block, delta's second and third "
            "reads, per-row parameters, the dB/dC atomics: one write each); bound = each input read "
            "once, each output written once; "
            "times = bytes / bandwidth; DRAM only: neither the exponentials and scans nor L2's "
            "throughput for the atomics (their bytes are in issued) are modelled",
            "bandwidth_bytes_per_s": H100_SXM_BANDWIDTH,
            "bandwidth_source": "NVIDIA H100 Tensor Core GPU datasheet: H100 SXM, GPU memory bandwidth "
            "3.35 TB/s",
        },
        "roofline_launch": {
            "batch": cfg.roofline.batch,
            "dim": cfg.roofline.dim,
            "length": cfg.roofline.length,
            "groups": cfg.roofline.groups,
            "optional": list(cfg.roofline.optional or []),
            "softplus": bool(cfg.roofline.softplus),
            "deterministic": bool(cfg.roofline.deterministic),
            "d_state": "each variant's BLOCK_N",
        },
        "rows": rows,
        "goals": {
            "compiles": {"status": "met" if not failed else "not met", "failed": failed},
            "zero_spills": {"status": "met" if not spilled and not failed else "not met", "spilled": spilled},
            "roofline_ratio": {
                "goal": cfg.goal_ratio,
                "status": "met" if not over else "not met",
                "over": over,
                "note": "estimate",
            },
        },
    }


def format_table(result: dict) -> str:
    archs = list(result["ptxas"])
    head = ["kernel", "dtype", "BLOCK_D", "BLOCK_N", "K", "warps"]
    for a in archs:
        head += [f"{a} regs", f"{a} spill st/ld", f"{a} smem"]
    head += ["B/token issued", "B/token DRAM est.", "B/token bound", "est. us", "bound us", "est/bound"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["kernel"], r["dtype"], *(str(r[k]) for k in ("BLOCK_D", "BLOCK_N", "K", "num_warps"))]
        for a in archs:
            t = r["targets"][a]
            if "error" in t:
                cells += ["error", "-", "-"]
            else:
                cells += [str(t["registers"]), f"{t['spill_stores']}/{t['spill_loads']}", str(t["shared"])]
        f = r["roofline"]
        cells += [
            f"{f['issued_bytes_per_token']:,.0f}",
            f"{f['dram_bytes_per_token_estimate']:,.0f}",
            f"{f['compulsory_bytes_per_token']:,.0f}",
            f"{f['estimate_us']:.1f}",
            f"{f['bound_us']:.1f}",
            f"{f['ratio']:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    rl = result["roofline_launch"]
    lines.append("")
    lines.append(
        f"roofline (ESTIMATE from byte counts, not measured): batch {rl['batch']}, dim {rl['dim']}, "
        f"L {rl['length']}, groups {rl['groups']}, d_state = BLOCK_N, optional {rl['optional']}, "
        f"softplus {rl['softplus']}, deterministic {rl['deterministic']}; "
        "H100 SXM HBM3 3.35 TB/s (NVIDIA datasheet); memory only"
    )
    for name, goal in result["goals"].items():
        detail = {k: v for k, v in goal.items() if k != "status" and v}
        lines.append(f"goal {name}: {goal['status']}" + (f" {detail}" if detail else ""))
    lines.append(
        f"ptxas: {result['ptxas']}; triton {result['triton']}; compiled now "
        f"{result['compiled_now']}, in {result['compile_s']:.1f} s"
    )
    return "\n".join(lines)


@hydra_entry("bench_triton")
def main(cfg: DictConfig) -> dict:
    validate_config(cfg)
    result = benchmark(cfg)
    path = write_result(cfg.output_json, result)
    print(format_table(result))
    print(f"results: {path}")
    return result
