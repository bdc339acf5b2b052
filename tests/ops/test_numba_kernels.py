from __future__ import annotations

import numpy as np
import pytest
import torch
from ops_scan_cases import assert_matches_ref, make_inputs

numba = pytest.importorskip("numba")

from recsys_mamba.ops._numba_kernels import W, fast_exp, fast_softplus  # noqa: E402
from recsys_mamba.ops.checks import ScanArgs  # noqa: E402
from recsys_mamba.ops.cpu import selective_scan_cpu  # noqa: E402


def _elementwise(fn):
    """A compiled loop applying a numba-only scalar function (fast_exp, fast_softplus) to a 1-D array."""

    @numba.njit
    def apply(x):
        out = np.empty_like(x)
        for j in range(x.size):
            out[j] = fn(x[j])
        return out

    return apply


_fast_exp_all = _elementwise(fast_exp)
_fast_softplus_all = _elementwise(fast_softplus)


@pytest.mark.parametrize(("dtype", "lo", "hi"), [(np.float32, -87.0, 88.0), (np.float64, -708.0, 709.0)])
def test_fast_exp_is_accurate_to_the_dtype_over_its_whole_range(dtype, lo, hi):
    x = np.concatenate([np.linspace(lo, hi, 100_001), np.linspace(-1.0, 1.0, 10_001)]).astype(dtype)
    got = _fast_exp_all(x)
    assert got.dtype == dtype
    rel = np.abs(got.astype(np.float64) / np.exp(x.astype(np.float64)) - 1.0)
    assert rel.max() < 2 * np.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_softplus_is_accurate_to_the_dtype_over_its_whole_range(dtype):
    # Relative error, so the tail where softplus(x) ~ exp(x) is tiny counts as much as the rest.
    x = np.concatenate([np.linspace(-80.0, 80.0, 100_001), np.linspace(-1.0, 1.0, 10_001)]).astype(dtype)
    got = _fast_softplus_all(x)
    assert got.dtype == dtype
    want = np.logaddexp(0.0, x.astype(np.float64))
    assert (np.abs(got / want - 1.0)).max() < 4 * np.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_exp_saturates_instead_of_overflowing(dtype):
    tiny, huge = _fast_exp_all(np.array([-1e6, 1e6], dtype=dtype))
    assert 0.0 < tiny <= 2 * np.finfo(dtype).tiny
    assert np.isfinite(huge) and huge > np.finfo(dtype).max / 4


@pytest.mark.parametrize("name", ["u", "delta", "B", "z"])
def test_nan_inputs_reach_the_scan_output(name):
    # The non-finite loss guard relies on NaNs surviving the scan, fast exp or not.
    x = {"u": torch.randn(1, 4, 8), "delta": torch.rand(1, 4, 8), "A": -torch.rand(4, 16),
         "D": torch.randn(4), "z": torch.randn(1, 4, 8),
         "B": torch.randn(1, 16, 8), "C": torch.randn(1, 16, 8)}
    x[name][..., 3] = float("nan")
    out = selective_scan_cpu(ScanArgs(**x))
    assert out[..., 3:].isnan().any() and not out[..., :3].isnan().any()


@pytest.mark.parametrize(
    "shape",
    [(2, 2 * (W + 4), 30, 4, 2), (1, 2 * W + 1, 20, 16, 0), (3, W, 9, 2, 0), (2, 24, 7, 3, 0)],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channel_blocks_that_straddle_groups_or_end_short(shape, dtype):
    # Kernels work on blocks of W channels inside one B/C group: 2 (W + 4) channels in 2 groups -> blocks
    # of W + 4 per group; 2 W + 1 channels -> W + W + 1; 24 channels -> one short block.
    tol = {"rtol": 6e-4, "atol": 2e-3} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-9}
    assert_matches_ref("cpu", make_inputs(*shape, dtype=dtype, seed=3), True, **tol)
