"""Triton kernels against `ref` on CPU through the interpreter.

TRITON_INTERPRET must be set before triton is imported, so under a normal run the one test here
re-runs this file in a subprocess with the variable set.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from ops_scan_cases import assert_matches_ref, assert_plain_grads_match, make_inputs, run

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(INTERPRETED, reason="already inside the interpreter run")
def test_triton_kernels_under_interpreter():
    env = os.environ | {"TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess")


@interpreted
@pytest.mark.parametrize(
    ("shape", "extras", "softplus"),
    [
        ((2, 4, 37, 5, 0), False, False),
        ((1, 3, 1, 4, 0), True, True),
        ((1, 17, 70, 16, 0), True, True),  # dim, length not multiples of the blocks; 3 chunks
        ((2, 8, 33, 3, 2), True, False),
        ((1, 12, 40, 3, 3), True, True),  # 4 channels a group: one masked block per group
        ((1, 3, 20, 130, 0), True, True),  # d_state > 128: BLOCK_N 256, chunks of 16, 2 channels a block
        ((1, 3, 70, 40, 0), True, True),  # BLOCK_N 64: chunks of 64 (a tail), 1-channel backward blocks
    ],
    ids=str,
)
def test_triton_matches_ref(shape, extras, softplus):
    assert_matches_ref("triton", make_inputs(*shape, extras=extras), softplus)


@interpreted
def test_triton_half_inputs():
    from recsys_mamba.ops import selective_scan, selective_scan_ref

    x = make_inputs(1, 4, 20, 4, 0)
    out, last = selective_scan(**{k: v.half() if k != "A" else v for k, v in x.items()},
                               return_last_state=True, backend="triton")
    assert out.dtype == torch.float16 and last.dtype == torch.float32
    torch.testing.assert_close(out.float(), selective_scan_ref(**x), rtol=2e-2, atol=2e-2)


@interpreted
def test_triton_no_optional_inputs():
    assert_plain_grads_match("triton")


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@interpreted
def test_deterministic_mode_sums_stored_partials(deterministic):
    x = make_inputs(1, 20, 20, 5, 1)  # 20 channels in one group: two backward channel blocks add into dB, dC
    assert_matches_ref("triton", x, True)
    det = run("triton", x, True)
    torch.use_deterministic_algorithms(False)
    atomic = run("triton", x, True)
    for name in det:
        torch.testing.assert_close(det[name], atomic[name], rtol=1e-5, atol=1e-6)


def _tally_loads_and_stores(monkeypatch, call):
    """Runs `call` with the kernels' loads and stores counted: {(kernel, argument): [read, written]}."""
    import numpy as np
    from triton.runtime.interpreter import InterpreterBuilder

    from recsys_mamba.ops import triton_scan

    ranges: list[tuple[int, int, str, str]] = []  # (first byte, end, kernel, argument)
    tally: dict[tuple[str, str], list[int]] = {}

    def count(ptrs, mask, slot):
        addr = ptrs.data.ravel()
        live = np.broadcast_to(mask.data, ptrs.data.shape).ravel()
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        hits = np.zeros(addr.shape, dtype=int)
        for start, end, kernel, name in ranges:
            inside = live & (addr >= start) & (addr < end)
            hits += inside
            if inside.any():
                tally.setdefault((kernel, name), [0, 0])[slot] += int(inside.sum()) * size
        assert hits.max(initial=0) <= 1, "an access fell in two arguments' memory"
        assert (hits[live] == 1).all(), "an access fell outside every argument"

    real_load, real_store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store
    real_rmw = InterpreterBuilder.create_atomic_rmw

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        count(ptrs, mask, 0)
        return real_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        count(ptrs, mask, 1)
        return real_store(self, ptrs, value, mask, cache_policy)

    def rmw(self, op, ptrs, value, mask, sem, scope):  # an atomic add reads and writes its address
        count(ptrs, mask, 0)
        count(ptrs, mask, 1)
        return real_rmw(self, op, ptrs, value, mask, sem, scope)

    class Watched:
        def __init__(self, kernel, short):
            self.kernel, self.short = kernel, short

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                ranges.clear()
                for name, arg in zip(self.kernel.arg_names, args, strict=False):
                    if isinstance(arg, torch.Tensor) and arg.numel() > 1:
                        start = arg.data_ptr()
                        ranges.append((start, start + arg.numel() * arg.element_size(), self.short, name))
                return self.kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(InterpreterBuilder, "create_masked_load", load)
    monkeypatch.setattr(InterpreterBuilder, "create_masked_store", store)
    monkeypatch.setattr(InterpreterBuilder, "create_atomic_rmw", rmw)
    monkeypatch.setattr(triton_scan, "_scan_fwd_kernel", Watched(triton_scan._scan_fwd_kernel, "fwd"))
    monkeypatch.setattr(triton_scan, "_scan_bwd_kernel", Watched(triton_scan._scan_bwd_kernel, "bwd"))
    call()
    return tally


@interpreted
@pytest.mark.parametrize(
    ("shape", "extras", "with_h0", "dtype", "det"),
    [
        ((2, 20, 40, 5, 0), True, True, torch.float32, False),  # two channel blocks, two chunks, tails
        # the same, dB/dC as stored partial sums (slow: run with TRITON_INTERPRET=1 pytest -m slow this file)
        pytest.param((2, 20, 40, 5, 0), True, True, torch.float32, True, marks=pytest.mark.slow),
        ((1, 12, 40, 3, 3), False, False, torch.bfloat16, False),  # groups; no D, z, delta_bias, state
        ((1, 5, 9, 40, 0), True, False, torch.float16, False),  # BLOCK_N 64
    ],
    ids=str,
)
def test_traffic_model_counts_the_kernels_loads_and_stores(monkeypatch, shape, extras, with_h0, dtype, det):
    from recsys_mamba.ops import selective_scan
    from recsys_mamba.ops.triton_traffic import Access, Flags, ScanShape, kernel_traffic

    batch, dim, length, d_state, groups = shape
    x = {k: v.to(dtype) if k not in ("A", "initial_state") else v
         for k, v in make_inputs(*shape, extras=extras).items()}
    if not with_h0:
        x.pop("initial_state")
    leaves = {k: v.requires_grad_() for k, v in x.items()}

    def call():
        out = selective_scan(**leaves, delta_softplus=extras, backend="triton")
        out.float().sum().backward()

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(det)
    try:
        tally = _tally_loads_and_stores(monkeypatch, call)
    finally:
        torch.use_deterministic_algorithms(before)
    flags = Flags(D=extras, z=extras, delta_bias=extras, initial_state=with_h0, dlast=True, softplus=extras,
                  deterministic=det)
    scan_shape = ScanShape(batch, dim, length, d_state, max(1, groups))
    for kernel in ("fwd", "bwd"):
        model = kernel_traffic(kernel, scan_shape, torch.finfo(dtype).bits // 8, flags)
        counted = {name: Access(*rw) for (k, name), rw in tally.items() if k == kernel}
        assert counted == model, kernel
