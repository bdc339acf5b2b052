from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recsys_mamba.errors import RecsysError
from recsys_mamba.ops.linear_ce import linear_cross_entropy


def unfused(hidden, weight, targets):
    scores = hidden @ weight.t()
    scores[:, 0] = float("-inf")
    return F.cross_entropy(scores, targets)


def leaves(n, d, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(v, d, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(1, v, (n,), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, chunk_rows", [(50, 256), (300, 256), (257, 64), (7, 1)])
def test_loss_and_gradients_match_cross_entropy_of_the_full_score_matrix(dtype, n, chunk_rows):
    hidden, weight, targets = leaves(n, 16, 40, dtype)
    expected = unfused(hidden, weight, targets)
    want_h, want_w = torch.autograd.grad(expected, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    got_h, got_w = torch.autograd.grad(loss, (hidden, weight))
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-6, "atol": 1e-7}
    torch.testing.assert_close(loss.double(), expected.double(), **tol)
    torch.testing.assert_close(got_h.to(dtype), want_h, **tol)
    torch.testing.assert_close(got_w.to(dtype), want_w, **tol)
    assert got_w[0].abs().max() == 0  # the padding item never gets a gradient


def test_upstream_gradient_scales_both_gradients():
    hidden, weight, targets = leaves(30, 8, 20, torch.float64)
    (3.0 * linear_cross_entropy(hidden, weight, targets)).backward()
    expected_h, expected_w = torch.autograd.grad(3.0 * unfused(hidden, weight, targets), (hidden, weight))
    torch.testing.assert_close(hidden.grad, expected_h)
    torch.testing.assert_close(weight.grad, expected_w)


def test_works_without_gradients_and_with_only_one_input_needing_one():
    hidden, weight, targets = leaves(30, 8, 20, torch.float32)
    expected = unfused(hidden, weight, targets).item()
    with torch.no_grad():
        assert linear_cross_entropy(hidden, weight, targets).item() == pytest.approx(expected, rel=1e-5)
    loss = linear_cross_entropy(hidden.detach(), weight, targets)
    loss.backward()
    assert weight.grad is not None and hidden.grad is None


def test_autocast_computes_in_float32():
    hidden, weight, targets = leaves(64, 16, 50, torch.float32)
    expected = unfused(hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("bad", [0, 20, -1])
def test_targets_outside_the_item_range_are_refused(bad):
    hidden, weight, targets = leaves(10, 4, 20, torch.float32)
    targets[3] = bad
    with pytest.raises(RecsysError, match=r"targets must lie in \[1, 20\)"):
        linear_cross_entropy(hidden, weight, targets)


def test_shape_mismatches_are_refused():
    hidden, weight, targets = leaves(10, 4, 20, torch.float32)
    with pytest.raises(RecsysError, match="hidden"):
        linear_cross_entropy(hidden, weight[:, :3], targets)
    with pytest.raises(RecsysError, match="targets must be"):
        linear_cross_entropy(hidden, weight, targets[:5])
    with pytest.raises(RecsysError, match="chunk_rows"):
        linear_cross_entropy(hidden, weight, targets, chunk_rows=0)
