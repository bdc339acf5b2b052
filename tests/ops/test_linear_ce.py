from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recsys_mamba.errors import RecsysError
from recsys_mamba.models.score_terms import History, SeenColumns
from recsys_mamba.ops.linear_ce import FixedColumns, SparseScore, linear_cross_entropy


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


def brute_seen(items, rows, positions, n_classes):
    """(N, n_classes) bool: the items of sequence rows[i] at positions 0..positions[i], looped."""
    mask = torch.zeros(len(rows), n_classes, dtype=torch.bool)
    for i, (r, p) in enumerate(zip(rows.tolist(), positions.tolist(), strict=True)):
        for item in items[r, : p + 1].tolist():
            if item:
                mask[i, item] = True
    return mask


def dense(columns, n_classes):
    """The (rows, n_classes) values of sparse columns (values None: 1 at every column > 0)."""
    cols, values = columns.part()
    added = (cols > 0).double() if values is None else values.double() * (cols > 0)
    return torch.zeros(cols.shape[0], n_classes, dtype=torch.float64).scatter_add(1, cols, added)


def test_seen_items_are_each_positions_own_causal_prefix():
    items = torch.tensor([[3, 5, 3, 2, 0, 0], [1, 1, 4, 5, 2, 6], [6, 0, 0, 0, 0, 0]])
    where = items != 0
    where[1, 2] = False
    seen = History.causal(items, where)
    torch.testing.assert_close(
        dense(SeenColumns(seen), 7) > 0, brute_seen(items, seen.rows, seen.positions, 7)
    )
    assert dense(SeenColumns(seen), 7)[:, 0].sum() == 0  # padding is never "seen"
    last = History.last(items, where.sum(1) + torch.tensor([0, 1, 0]))
    want = brute_seen(items, torch.arange(3), torch.tensor([3, 5, 0]), 7)
    torch.testing.assert_close(dense(SeenColumns(last), 7) > 0, want)
    candidates = torch.tensor([[3, 2, 6], [1, 6, 6], [6, 1, 0]])
    expected = torch.stack([want[i, candidates[i]] for i in range(3)])
    torch.testing.assert_close(SeenColumns(last).at(candidates), expected)


@pytest.mark.parametrize("chunk_rows", [256, 3])
def test_a_seen_term_matches_the_full_score_matrix_plus_the_bias_on_seen_items(chunk_rows):
    g = torch.Generator().manual_seed(3)
    items = torch.randint(1, 12, (4, 9), generator=g)  # repeats within a row on purpose
    items[2, 6:] = 0
    where = items != 0
    seen = History.causal(items, where)
    hidden, weight, targets = leaves(int(where.sum()), 6, 12, torch.float64, seed=4)
    targets = torch.where(torch.arange(len(targets)) % 3 == 0, items[where], targets)  # some repeats
    bias = torch.tensor(-0.8, dtype=torch.float64, requires_grad=True)
    scores = hidden @ weight.t() + bias * brute_seen(items, seen.rows, seen.positions, 12)
    scores[:, 0] = float("-inf")
    expected = F.cross_entropy(scores, targets)
    want = torch.autograd.grad(expected, (hidden, weight, bias))
    terms = [SparseScore(bias, SeenColumns(seen))]
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows, terms=terms)
    got = torch.autograd.grad(loss, (hidden, weight, bias))
    torch.testing.assert_close(loss, expected)
    for g_got, g_want in zip(got, want, strict=True):
        torch.testing.assert_close(g_got, g_want)
    assert want[2].abs() > 1e-3  # the bias gradient is a real check, not zero against zero


def test_a_term_needs_a_scalar_weight_and_one_row_per_target():
    hidden, weight, targets = leaves(4, 6, 12, torch.float32)
    seen = History.causal(torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(RecsysError, match="one row per target"):
        linear_cross_entropy(
            hidden[:3], weight, targets[:3], terms=[SparseScore(torch.zeros(()), SeenColumns(seen))]
        )
    with pytest.raises(RecsysError, match="scalar"):
        linear_cross_entropy(hidden, weight, targets, terms=[SparseScore(torch.ones(2), SeenColumns(seen))])


@pytest.mark.parametrize("chunk_rows", [256, 2])
def test_weighted_values_and_a_seen_term_match_the_full_score_matrix(chunk_rows):
    """Explicit (items, values) per row, together with the seen bias, as the transition prior uses it."""
    g = torch.Generator().manual_seed(5)
    hidden, weight, targets = leaves(7, 6, 12, torch.float64, seed=6)
    items = torch.stack([torch.randperm(11, generator=g)[:4] + 1 for _ in range(7)])  # distinct per row
    items[:, 3] = 0  # a padding slot in every row, and a value on it that must add nothing
    values = torch.rand(7, 4, generator=g, dtype=torch.float64)
    seen = History.last(torch.randint(1, 12, (7, 3), generator=g), torch.full((7,), 3))
    bias = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    prior_weight = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    fixed = FixedColumns(items, values)
    scores = hidden @ weight.t() + bias * dense(SeenColumns(seen), 12) + prior_weight * dense(fixed, 12)
    scores[:, 0] = float("-inf")
    expected = F.cross_entropy(scores, targets)
    want = torch.autograd.grad(expected, (hidden, weight, bias, prior_weight))
    terms = [SparseScore(bias, SeenColumns(seen)), SparseScore(prior_weight, fixed)]
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows, terms)
    got = torch.autograd.grad(loss, (hidden, weight, bias, prior_weight))
    torch.testing.assert_close(loss, expected)
    for g_got, g_want in zip(got, want, strict=True):
        torch.testing.assert_close(g_got, g_want)
    assert want[3].abs() > 1e-3
    torch.testing.assert_close(fixed.at(items), values * (items > 0))  # lookups find each row's own values


@pytest.mark.parametrize("eps, chunk_rows", [(0.1, 256), (0.3, 3)])
def test_label_smoothing_matches_torch_over_the_real_items_with_terms(eps, chunk_rows):
    """Smoothing spreads eps over items 1..V-1 (never the padding column), with the sparse terms in
    the scores it averages: torch's label-smoothed cross-entropy of the columns 1.. of the same scores."""
    g = torch.Generator().manual_seed(9)
    hidden, weight, targets = leaves(11, 6, 15, torch.float64, seed=10)
    seen = History.last(torch.randint(1, 15, (11, 4), generator=g), torch.full((11,), 4))
    bias = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    scores = hidden @ weight.t() + bias * dense(SeenColumns(seen), 15)
    expected = F.cross_entropy(scores[:, 1:], targets - 1, label_smoothing=eps)
    want = torch.autograd.grad(expected, (hidden, weight, bias))
    terms = [SparseScore(bias, SeenColumns(seen))]
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows, terms, label_smoothing=eps)
    got = torch.autograd.grad(loss, (hidden, weight, bias))
    torch.testing.assert_close(loss, expected)
    for g_got, g_want in zip(got, want, strict=True):
        torch.testing.assert_close(g_got, g_want)
    assert got[1][0].abs().max() == 0  # still no gradient into the padding item
    plain = linear_cross_entropy(hidden, weight, targets, chunk_rows, terms)
    assert abs(loss.item() - plain.item()) > 1e-3  # the option changes the loss


@pytest.mark.parametrize("eps", [-0.1, 1.0])
def test_label_smoothing_outside_zero_to_one_is_refused(eps):
    hidden, weight, targets = leaves(4, 3, 6, torch.float32)
    with pytest.raises(RecsysError, match="label_smoothing"):
        linear_cross_entropy(hidden, weight, targets, label_smoothing=eps)
