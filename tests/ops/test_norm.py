from __future__ import annotations

import pytest
import torch

from recsys_mamba.errors import RecsysError
from recsys_mamba.models.mamba import RMSNorm
from recsys_mamba.ops import norm
from recsys_mamba.ops.norm import rms_norm


def _reference(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.fixture(autouse=True)
def _always_fused(monkeypatch):
    # the fused kernel only takes inputs of FUSED_MIN_NUMEL elements or more; test it on small ones too
    monkeypatch.setattr(norm, "FUSED_MIN_NUMEL", 1)


@pytest.mark.parametrize("shape", [(5, 7, 64), (3, 33), (1, 1, 1, 8), (130, 16)], ids=str)
def test_fused_rms_norm_matches_the_formula_in_value_and_gradients(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(shape[-1], generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    got, want = rms_norm(x, weight, 1e-5), _reference(x, weight, 1e-5)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(*shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, (x, weight), upstream),
                    torch.autograd.grad(want, (x, weight), upstream), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_float32_and_non_contiguous_input():
    x = torch.randn(6, 40, 32).transpose(0, 1)  # not contiguous
    weight = torch.rand(32) + 0.5
    got = rms_norm(x, weight, 1e-5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _reference(x, weight, 1e-5), rtol=1e-5, atol=1e-6)


def test_module_keeps_nn_rmsnorm_state_dict_and_output():
    ours, theirs = RMSNorm(16, eps=1e-5), torch.nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 9, 16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    # bfloat16 (autocast) takes torch's own op
    torch.testing.assert_close(ours.bfloat16()(x.bfloat16()), theirs.bfloat16()(x.bfloat16()))


def test_small_inputs_take_torch_and_large_ones_the_kernel(monkeypatch):
    monkeypatch.setattr(norm, "FUSED_MIN_NUMEL", 65536)
    weight = torch.ones(64, requires_grad=True)
    small, large = torch.randn(4, 64, requires_grad=True), torch.randn(1024, 64, requires_grad=True)
    assert "_RMSNormFnBackward" not in _graph_names(rms_norm(small, weight, 1e-5).grad_fn)
    assert "_RMSNormFnBackward" in _graph_names(rms_norm(large, weight, 1e-5).grad_fn)


def _graph_names(fn, depth: int = 3) -> set[str]:
    """Names of the autograd nodes within `depth` steps of fn."""
    if fn is None or depth == 0:
        return set()
    names = {type(fn).__name__}
    for child, _ in fn.next_functions:
        names |= _graph_names(child, depth - 1)
    return names


@pytest.mark.parametrize(("x", "weight"),
                         [(torch.randn(3, 8), torch.ones(7)), (torch.tensor(1.0), torch.ones(1))])
def test_a_weight_that_does_not_fit_x_is_a_clear_error(x, weight):
    with pytest.raises(RecsysError, match=r"rms_norm: weight has shape .* expected \(d,\)"):
        rms_norm(x, weight, 1e-5)
