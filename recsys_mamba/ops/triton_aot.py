"""Ahead-of-time compilation of the Triton scan kernels for GPUs this machine does not have.

`triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))` runs
Triton's whole pipeline (TTIR, TTGIR, LLVM IR, PTX) and the bundled ptxas without a GPU or a CUDA driver.

The variants are not listed by hand. `launch_variants` drives the real launch code
(`selective_scan_triton`, forward and backward through autograd) over the options a caller can pass,
with the two kernels swapped for recorders, and turns each recorded launch into a signature, constexprs,
attributes and options with Triton's own binder: the path `kernel[grid](...)` takes on a GPU. Distinct
results are the binaries the code can launch. `compile_variant` compiles one for sm_80 or sm_90 and reads
registers, spills and stack from ptxas's verbose output on the generated PTX (the log of Triton's own
ptxas run, which passes -v).

Written against Triton 3.9's compiler API (`create_function_from_signature`, `JITFunction._pack_args`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from recsys_mamba.errors import RecsysError
from recsys_mamba.ops import triton_scan
from recsys_mamba.ops.checks import ScanArgs

ARCHS = (80, 90)  # A100 (sm_80) and H100 (sm_90a)
KERNELS = ("_scan_fwd_kernel", "_scan_bwd_kernel")


@dataclass(frozen=True)
class Launch:
    """One `kernel[grid](*args, **kwargs)` call, recorded instead of run."""

    kernel: JITFunction
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Within the block, triton_scan's kernels append their launches to the yielded list and do nothing."""
    launches: list[Launch] = []

    class _Recorder:
        def __init__(self, kernel: JITFunction) -> None:
            self.kernel = kernel

        def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
            def launch(*args: Any, **kwargs: Any) -> None:
                launches.append(Launch(self.kernel, tuple(grid), args, kwargs))

            return launch

    saved = {name: getattr(triton_scan, name) for name in KERNELS}
    try:
        for name, kernel in saved.items():
            setattr(triton_scan, name, _Recorder(kernel))
        yield launches
    finally:
        for name, kernel in saved.items():
            setattr(triton_scan, name, kernel)


@dataclass(frozen=True)
class Variant:
    """One binary: what Triton's launcher would compile for a recorded launch."""

    kernel: str
    signature: tuple[tuple[str, str], ...]  # (argument, Triton type), "constexpr" for constexprs
    constexprs: tuple[tuple[str, Any], ...]
    attrs: tuple[tuple[int, str], ...]  # argument index -> its specialisation attributes, as text
    num_warps: int

    @property
    def short(self) -> str:
        return {"_scan_fwd_kernel": "fwd", "_scan_bwd_kernel": "bwd"}[self.kernel]

    @property
    def dtype(self) -> str:
        """The activation dtype: the element type of u_ptr, e.g. "bf16"."""
        return dict(self.signature)["u_ptr"].lstrip("*")

    def constexpr(self, name: str) -> Any:
        return dict(self.constexprs)[name]

    @property
    def label(self) -> str:
        return (f"{self.short} {self.dtype} BLOCK_D={self.constexpr('BLOCK_D')} "
                f"BLOCK_N={self.constexpr('BLOCK_N')} K={self.constexpr('K')} warps={self.num_warps}")


def _bind(launch: Launch, target: GPUTarget) -> tuple[dict, dict, dict, Any]:
    """(signature, constexprs, attrs, options) as `JITFunction.run` computes them for this launch."""
    kernel = launch.kernel
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    # JITFunction.run adds these before binding (Triton 3.9, runtime/jit.py).
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or triton.knobs.runtime.debug
    kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = triton.knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization,
                                                              options)
    return signature, constexprs, attrs, options


def variant_of(launch: Launch, arch: int = 90) -> Variant:
    signature, constexprs, attrs, options = _bind(launch, GPUTarget("cuda", arch, 32))
    names = [p.name for p in launch.kernel.params]
    return Variant(
        kernel=launch.kernel.__name__,
        signature=tuple(signature.items()),
        constexprs=tuple((names[path[0]], value) for path, value in sorted(constexprs.items())),
        attrs=tuple((path[0], repr(value)) for path, value in sorted(attrs.items()) if value),
        num_warps=options.num_warps,
    )


# ---------------------------------------------------------------------------------------------------
# Every launch the code can make: the options of `selective_scan` crossed with dtypes and shapes.

# Per-tensor dtypes a caller can pass: one dtype throughout; fp32 parameters (A, D, delta_bias, initial
# state) with low-precision activations, as MambaMixer under bf16/fp16 autocast; that plus an fp32 delta
# (its carried-state path, where dt is softplus'd in fp32); and fp16 beside bf16.
_DTYPE_PROFILES: dict[str, dict[str, torch.dtype]] = {}
for _name, _dt in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16),
                   ("fp64", torch.float64)):
    _DTYPE_PROFILES[_name] = dict.fromkeys(("u", "delta", "B", "C", "D", "z", "delta_bias",
                                            "initial_state"), _dt) | {"A": torch.float32}
for _name, _dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
    _params = dict.fromkeys(("A", "D", "delta_bias", "initial_state"), torch.float32)
    _DTYPE_PROFILES[f"{_name}-autocast"] = dict.fromkeys(("u", "delta", "B", "C", "z"), _dt) | _params
    _DTYPE_PROFILES[f"{_name}-autocast-fp32-delta"] = (_DTYPE_PROFILES[f"{_name}-autocast"]
                                                       | {"delta": torch.float32})
_DTYPE_PROFILES["fp16-bf16"] = _DTYPE_PROFILES["fp16"] | {"B": torch.bfloat16, "C": torch.bfloat16}

OPTIONAL = ("D", "z", "delta_bias", "initial_state")


def d_state_representatives() -> list[int]:
    """The smallest and largest d_state of every launch config over 1..MAX_D_STATE."""
    by_config: dict[triton_scan.LaunchConfig, list[int]] = {}
    for n in range(1, triton_scan.MAX_D_STATE + 1):
        by_config.setdefault(triton_scan.launch_config(n), []).append(n)
    return sorted({n for ns in by_config.values() for n in (ns[0], ns[-1])})


@dataclass(frozen=True)
class Case:
    """One call of `selective_scan_triton` and its backward."""

    batch: int = 1
    dim: int = 4
    length: int = 5
    d_state: int = 16
    groups: int = 0  # 0: B, C (batch, d_state, length); else (batch, groups, d_state, length)
    dtypes: str = "fp32"
    present: tuple[str, ...] = OPTIONAL
    softplus: bool = True
    return_last_state: bool = True
    loss_on: str = "both"  # which outputs the loss uses: "out", "last" or "both"


def run_case(case: Case) -> None:
    """Calls the launch code for `case` (use inside `recording()`: the kernels do not run)."""
    dt = _DTYPE_PROFILES[case.dtypes]
    b, d, L, n = case.batch, case.dim, case.length, case.d_state
    bc = (b, n, L) if not case.groups else (b, case.groups, n, L)
    shapes = {"u": (b, d, L), "delta": (b, d, L), "A": (d, n), "B": bc, "C": bc, "D": (d,), "z": (b, d, L),
              "delta_bias": (d,), "initial_state": (b, d, n)}
    names = ("u", "delta", "A", "B", "C", *(k for k in OPTIONAL if k in case.present))
    x = {k: torch.zeros(shapes[k], dtype=dt[k]).requires_grad_() for k in names}
    res = triton_scan.selective_scan_triton(
        ScanArgs(**x, delta_softplus=case.softplus, return_last_state=case.return_last_state)
    )
    out, last = res if case.return_last_state else (res, None)
    loss = {"out": out.sum(), "last": None if last is None else last.sum()}
    if case.loss_on == "both" and last is not None:
        (loss["out"] + loss["last"]).backward()
    elif case.loss_on == "last" and last is not None:
        loss["last"].backward()
    else:
        loss["out"].backward()


def launch_cases() -> list[Case]:
    """Every option combination at one shape, every dtype profile at every launch config, and shapes
    that Triton would specialise on (ints equal to 1 or multiples of 16) if the kernels let it."""
    cases = []
    for flags in itertools.product((False, True), repeat=len(OPTIONAL)):
        present = tuple(k for k, f in zip(OPTIONAL, flags, strict=True) if f)
        for softplus, ret, loss_on, dtypes in itertools.product(
            (False, True), (False, True), ("out", "last", "both"), ("fp32", "bf16-autocast")
        ):
            if loss_on != "out" and not ret:
                continue
            cases.append(Case(present=present, softplus=softplus, return_last_state=ret, loss_on=loss_on,
                              dtypes=dtypes))
    for n, dtypes in itertools.product(d_state_representatives(), _DTYPE_PROFILES):
        cases.append(Case(d_state=n, dtypes=dtypes))
    for (b, d, L), groups in itertools.product(((1, 1, 1), (2, 16, 32), (3, 17, 33), (16, 32, 64)), (0, 1)):
        cases.append(Case(batch=b, dim=d, length=L, groups=groups))
    cases.append(Case(dim=16, groups=4))
    cases.append(Case(dim=48, groups=3, d_state=5))
    return cases


@functools.cache
def _launch_index() -> dict[Variant, Launch]:
    """Each distinct binary over `launch_cases()` and the first launch that produced it."""
    index: dict[Variant, Launch] = {}
    with recording() as launches:
        for case in launch_cases():
            run_case(case)
    for launch in launches:
        index.setdefault(variant_of(launch), launch)
    return index


def launch_variants() -> tuple[Variant, ...]:
    """The binaries the code can launch, forward first, then by dtype and BLOCK_N."""
    order = {"fp32": 0, "fp16": 1, "bf16": 2}
    return tuple(sorted(_launch_index(), key=lambda v: (
        v.kernel != KERNELS[0], order.get(v.dtype, 9), v.dtype, v.constexpr("BLOCK_N"))))


def launch_for(variant: Variant) -> Launch:
    """A recorded launch that produces `variant`."""
    return _launch_index()[variant]


# ---------------------------------------------------------------------------------------------------
# Compiling and reading ptxas's figures


@dataclass(frozen=True)
class PtxasUsage:
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # bytes of stack frame


_PTXAS_RE = {
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "registers": re.compile(r"Used (\d+) registers"),
}


def parse_ptxas_log(log: str) -> PtxasUsage:
    values = {}
    for key, pattern in _PTXAS_RE.items():
        m = pattern.search(log)
        if m is None:
            raise RecsysError(f"ptxas -v printed no '{pattern.pattern}' line:\n{log}")
        values[key] = int(m.group(1))
    return PtxasUsage(**values)


def ptxas_verbose(ptx: str, arch: int, fp_fusion: bool = True) -> tuple[str, bytes]:
    """ptxas -v on `ptx` with the flags Triton 3.9's make_cubin passes; returns (log, cubin)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v",
               "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", dst]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RecsysError(f"ptxas failed ({proc.returncode}): {proc.stderr}")
        with open(dst, "rb") as f:
            return proc.stderr, f.read()


@dataclass(frozen=True)
class Compiled:
    variant: Variant
    arch: int
    usage: PtxasUsage
    shared: int  # bytes of shared memory (Triton's metadata)
    num_warps: int
    ptx_chars: int
    cubin_bytes: int
    cached: bool  # Triton's cache held the binary (compiled before, same source, options and target)


_LOG_FILE = "ptxas-v.log"  # stored beside the binary in Triton's cache


@functools.cache
def compile_variant(variant: Variant, arch: int) -> Compiled:
    """Compiles one variant for sm_<arch> through `triton.compile`; raises what Triton or ptxas raise."""
    return compile_launch(launch_for(variant), arch, variant)


def compile_launch(launch: Launch, arch: int, variant: Variant | None = None, **options: Any) -> Compiled:
    """Compiles the binary `launch` would get on an sm_<arch> GPU (`options` override Triton's).

    Triton's own ptxas run prints its -v log (knobs.nvidia.dump_ptxas_log); the log is kept in
    Triton's cache beside the cubin, so a cache hit still has its figures. A binary cached by an
    ordinary launch has no log: ptxas -v then runs on its PTX with Triton's flags.
    """
    from triton.runtime.cache import get_cache_manager

    target = GPUTarget("cuda", arch, 32)
    if options:
        launch = Launch(launch.kernel, launch.grid, launch.args, launch.kwargs | options)
    signature, constexprs, attrs, opts = _bind(launch, target)
    printed = io.StringIO()
    with triton.knobs.nvidia.scope(), contextlib.redirect_stdout(printed):
        triton.knobs.nvidia.dump_ptxas_log = True
        kernel = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                                options=opts.__dict__)
    ptx, cubin = kernel.asm["ptx"], kernel.asm["cubin"]
    cache = get_cache_manager(kernel.hash)
    log = printed.getvalue()
    cached = "Used" not in log
    if cached:
        path = cache.get_file(_LOG_FILE)
        if path is not None:
            with open(path) as f:
                log = f.read()
        else:
            log, _ = ptxas_verbose(ptx, arch, opts.enable_fp_fusion)
    if cache.get_file(_LOG_FILE) is None:
        cache.put(log, _LOG_FILE, binary=False)
    return Compiled(
        variant=variant or variant_of(launch, arch),
        arch=arch,
        usage=parse_ptxas_log(log),
        shared=kernel.metadata.shared,
        num_warps=kernel.metadata.num_warps,
        ptx_chars=len(ptx),
        cubin_bytes=len(cubin),
        cached=cached,
    )


@dataclass(frozen=True)
class Failure:
    variant: Variant
    arch: int
    error: str


def _compile_job(job: tuple[int, int]) -> Compiled | Failure:
    index, arch = job
    variant = launch_variants()[index]
    try:
        return compile_variant(variant, arch)
    except Exception as err:  # every failure is reported, not just the first
        return Failure(variant, arch, f"{type(err).__name__}: {err}")


def default_workers() -> int:
    """Compile processes: RECSYS_COMPILE_WORKERS if set, else one per usable core, at most 8."""
    env = os.environ.get("RECSYS_COMPILE_WORKERS")
    if env:
        return max(1, int(env))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores))


def compile_all(variants: tuple[Variant, ...] | None = None, archs: tuple[int, ...] = ARCHS,
                workers: int | None = None, deadline: float | None = None) -> list[Compiled | Failure]:
    """Compiles every (variant, arch), in `workers` forked processes when more than one.

    Results come back in (variant, arch) order. Each worker shares Triton's on-disk cache, so a later
    `compile_variant` in this process (or a later run) reads the binaries and figures back cheaply.
    With a `deadline` (a time.monotonic() value) no job starts after it, and the jobs that did not
    finish in time are left out of the result.
    """
    everything = launch_variants()
    chosen = everything if variants is None else variants
    jobs = [(everything.index(v), arch) for v in chosen for arch in archs]
    workers = default_workers() if workers is None else workers

    def late() -> bool:
        return deadline is not None and time.monotonic() > deadline

    if workers <= 1 or len(jobs) <= 1:
        results = []
        for job in jobs:
            if late():
                break
            results.append(_compile_job(job))
        return results
    import multiprocessing

    results_by_job: dict[tuple[int, int], Compiled | Failure] = {}
    # fork: the children inherit the recorded launches; they only run Triton's compiler and ptxas.
    with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
        pending = {job: pool.apply_async(_compile_job, (job,)) for job in jobs}
        for job, handle in pending.items():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                results_by_job[job] = handle.get(timeout=left)
            except multiprocessing.TimeoutError:
                break  # leaving the block terminates the workers
    return [results_by_job[job] for job in jobs if job in results_by_job]
