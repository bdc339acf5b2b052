"""The Triton kernels compiled for real GPUs (sm_80, sm_90a) on a machine without one.

`triton_aot` records the launches `selective_scan_triton` makes (kernels swapped for recorders) and
compiles what each would get on a GPU. The variant set is checked for closure against random launches,
then every variant is compiled for both targets, failing on any compile error or register spill.

Compiling all 96 (variant, arch) pairs costs about 150 s of CPU when Triton's cache is cold; they run in
forked processes, one per core (RECSYS_COMPILE_WORKERS overrides), and Triton's on-disk cache (with the
ptxas figures stored beside each binary) makes a warm run take seconds.
"""

from __future__ import annotations

import random

import pytest
import torch

from recsys_mamba.ops import triton_aot, triton_scan
from recsys_mamba.ops.checks import ScanArgs
from recsys_mamba.ops.triton_aot import Case, Failure, compile_all, launch_variants, recording, run_case

BLOCK_NS = (2, 4, 8, 16, 32, 64, 128, 256)


def test_one_variant_per_kernel_dtype_and_block_n():
    variants = launch_variants()
    keys = [(v.short, v.dtype, v.constexpr("BLOCK_N")) for v in variants]
    assert sorted(keys) == sorted((k, dt, bn) for k in ("fwd", "bwd") for dt in ("fp32", "fp16", "bf16")
                                  for bn in BLOCK_NS)
    for v in variants:
        cfg = triton_scan.launch_config(v.constexpr("BLOCK_N"))
        block_d, warps = (cfg.fwd_block_d, cfg.fwd_warps) if v.short == "fwd" else (cfg.bwd_block_d,
                                                                                   cfg.bwd_warps)
        assert (v.constexpr("BLOCK_D"), v.constexpr("K"), v.num_warps) == (block_d, cfg.chunk, warps)
        sig = dict(v.signature)
        # no scalar is specialised (no "constexpr" ints equal to 1, no divisibility attributes on them)
        scalars = [name for name, ty in sig.items() if not ty.startswith("*") and ty != "constexpr"]
        assert all(sig[name] == "i32" for name in scalars)
        assert len(scalars) == (12 if v.short == "fwd" else 14)  # the backward's has_h0, shared_dbc
        assert {name for name, ty in sig.items() if ty == "constexpr"} == {"BLOCK_D", "BLOCK_N", "K"}
        pointer_indices = {i for i, (_, ty) in enumerate(v.signature) if ty.startswith("*")}
        assert {i for i, _ in v.attrs} == pointer_indices  # every pointer 16-byte aligned, nothing else
        # state, checkpoints and gradients are fp32; activations in the variant's dtype
        for name in ("A_ptr", "D_ptr", "bias_ptr", "h0_ptr", "ckpt_ptr"):
            assert sig[name] == "*fp32"
        for name in ("u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr"):
            assert sig[name] == f"*{v.dtype}"


def _random_case(rng: random.Random) -> Case:
    dtypes = ("fp32", "fp16", "bf16", "fp64", "bf16-autocast", "fp16-autocast", "bf16-autocast-fp32-delta",
              "fp16-bf16")
    groups = rng.choice((0, 1, 2, 3))
    dim = rng.randint(1, 40) * max(1, groups)
    ret = rng.random() < 0.5
    return Case(batch=rng.randint(1, 3), dim=dim, length=rng.randint(1, 80), d_state=rng.randint(1, 256),
                groups=groups, dtypes=rng.choice(dtypes),
                present=tuple(k for k in triton_aot.OPTIONAL if rng.random() < 0.5),
                softplus=rng.random() < 0.5, return_last_state=ret,
                loss_on=rng.choice(("out", "last", "both")) if ret else "out")


def test_random_launches_only_produce_enumerated_variants(reliability):
    known = set(launch_variants())
    rng = random.Random(1)
    cases = [_random_case(rng) for _ in range(60)]
    with recording() as launches:
        for case in cases:
            run_case(case)
    assert len(launches) == 2 * len(cases)  # a forward and a backward each
    for launch in launches:
        assert triton_aot.variant_of(launch) in known, launch.kwargs
    reliability.fuzz("triton/launch-variants", len(cases))


def test_misaligned_and_strided_inputs_launch_aligned_contiguous_copies():
    x = {"u": torch.zeros(2 * 4 * 9 + 1)[1:].view(2, 4, 9),  # contiguous but 4 bytes past alignment
         "delta": torch.zeros(2, 9, 4).transpose(1, 2), "A": -torch.ones(4, 3),
         "B": torch.zeros(2, 3, 9), "C": torch.zeros(2, 3, 9)}
    assert x["u"].data_ptr() % 16 == 4 and not x["delta"].is_contiguous()
    with recording() as launches:
        triton_scan.selective_scan_triton(ScanArgs(**x))
    (launch,) = launches
    tensors = [a for a in launch.args if isinstance(a, torch.Tensor)]
    assert all(t.data_ptr() % 16 == 0 and t.is_contiguous() for t in tensors)
    assert triton_aot.variant_of(launch) in set(launch_variants())


def test_d_state_beyond_the_kernels_limit_is_refused():
    with pytest.raises(triton_aot.RecsysError, match=r"d_state in 1\.\.256"):
        triton_scan.launch_config(257)


def test_every_variant_compiles_for_sm80_and_sm90_without_spills():
    variants = launch_variants()
    results = compile_all()
    failures = [f"sm_{r.arch} {r.variant.label}: {r.error}" for r in results if isinstance(r, Failure)]
    assert not failures, "\n".join(failures)
    assert {(r.variant, r.arch) for r in results} == {(v, a) for v in variants for a in (80, 90)}
    spills = [f"sm_{r.arch} {r.variant.label}: {r.usage}" for r in results
              if r.usage.spill_stores or r.usage.spill_loads or r.usage.stack]
    assert not spills, "\n".join(spills)
    for r in results:
        assert 0 < r.usage.registers <= 255 and r.cubin_bytes > 0 and r.ptx_chars > 0
        assert r.num_warps == r.variant.num_warps and 0 < r.shared <= 48 * 1024


def test_the_check_sees_compile_errors_and_spills():
    launch = triton_aot.launch_for(launch_variants()[0])  # forward, fp32, BLOCK_N=2
    with pytest.raises(Exception, match="arange"):  # BLOCK_N must be a power of two
        triton_aot.compile_launch(launch, 90, BLOCK_N=3)
    squeezed = triton_aot.compile_launch(launch, 90, maxnreg=24)  # far fewer registers than it needs
    assert squeezed.usage.registers <= 24 and squeezed.usage.spill_stores > 0


def test_ptxas_log_parsing():
    log = ("ptxas info    : Function properties for k\n"
           "    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 16 bytes cumulative stack size\n")
    assert triton_aot.parse_ptxas_log(log) == triton_aot.PtxasUsage(40, 12, 8, 16)
    with pytest.raises(triton_aot.RecsysError, match="stack frame"):
        triton_aot.parse_ptxas_log("ptxas info : Compile time = 1 ms")
