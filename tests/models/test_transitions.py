"""The transition table and the head's transition prior: counts, leave-one-out, ranking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recsys_mamba.errors import RecsysError
from recsys_mamba.models.heads import NextItemHead
from recsys_mamba.models.score_terms import History
from recsys_mamba.models.transitions import TransitionTable
from tests.models.conftest import make_encoder

# 1 -> 2 three times, 1 -> 3 once, 2 -> 1 once, 3 -> 5 once; item 4 never leads anywhere
SOURCES, TARGETS = [1, 1, 1, 2, 3, 1], [2, 2, 3, 1, 5, 2]


def brute_counts(n_items: int = 5) -> torch.Tensor:
    counts = torch.zeros(n_items + 1, n_items + 1)
    for a, b in zip(SOURCES, TARGETS, strict=True):
        counts[a, b] += 1
    return counts


def test_the_table_counts_every_pair_and_reads_back_the_same_counts_three_ways() -> None:
    table = TransitionTable(5, SOURCES, TARGETS)
    assert table.n_pairs == 4
    logs = brute_counts().log1p()
    items = torch.tensor([1, 2, 3, 4, 0])
    torch.testing.assert_close(table.dense(items), logs[items])
    cols, values = table.successors(items)
    assert cols.shape == (5, 2) and (cols[3:] == 0).all() and (values[3:] == 0).all()
    torch.testing.assert_close(torch.zeros(5, 6).scatter_add(1, cols, values), logs[items])
    candidates = torch.tensor([[2, 3, 4, 0], [1, 5, 2, 3], [5, 5, 1, 0], [1, 2, 3, 4], [1, 2, 0, 0]])
    expected = logs[items[:, None], candidates] * (candidates > 0)
    torch.testing.assert_close(table.values(items, candidates), expected)


def test_leave_one_out_drops_exactly_one_occurrence_of_the_predicted_pair() -> None:
    table = TransitionTable(5, SOURCES, TARGETS)
    cols, values = table.successors(torch.tensor([1, 3, 1]), exclude=torch.tensor([2, 5, 4]))
    counts = torch.zeros(3, 6).scatter_add(1, cols, values.expm1())
    assert counts[0, 2] == pytest.approx(2) and counts[0, 3] == pytest.approx(1)  # 3 - 1, untouched
    assert counts[1, 5] == pytest.approx(0)  # the only 3 -> 5 is the one being predicted
    assert counts[2, 2] == pytest.approx(3)  # excluding a pair that never occurred changes nothing


def test_an_empty_table_of_the_saved_size_loads_a_saved_one() -> None:
    table = TransitionTable(5, SOURCES, TARGETS)
    loaded = TransitionTable.empty(5, table.n_pairs)
    loaded.load_state_dict(table.state_dict())
    torch.testing.assert_close(loaded.dense(torch.arange(6)), table.dense(torch.arange(6)))
    with pytest.raises(RuntimeError, match="size mismatch"):
        TransitionTable.empty(5, 3).load_state_dict(table.state_dict())


@pytest.mark.parametrize(("sources", "targets"), [([1, 2], [3]), ([0], [1]), ([1], [6])])
def test_bad_pairs_are_refused(sources, targets) -> None:
    with pytest.raises(RecsysError, match="transition"):
        TransitionTable(5, sources, targets)


def head_with_prior(weight: float = 0.8) -> NextItemHead:
    head = NextItemHead(transition_prior=True)
    head.attach_transitions(TransitionTable(5, SOURCES, TARGETS))
    with torch.no_grad():
        head.transition_weight.fill_(weight)
    return head


def test_ranking_adds_the_weighted_log_counts_from_each_rows_last_item() -> None:
    encoder, head = make_encoder("mamba", n_items=5), head_with_prior()
    hidden = torch.randn(3, encoder.d_model)
    last = torch.tensor([1, 3, 4])
    history = History.last(torch.stack([torch.tensor([2, 1]), torch.tensor([5, 3]), torch.tensor([1, 4])]))
    scores = head.rank_scores(encoder, hidden, history)
    torch.testing.assert_close(scores, encoder.score_all(hidden) + 0.8 * brute_counts().log1p()[last])
    with pytest.raises(RecsysError, match="History"):
        head.rank_scores(encoder, hidden)
    with pytest.raises(RecsysError, match="attach_transitions"):
        NextItemHead(transition_prior=True).rank_scores(encoder, hidden, history)


@pytest.mark.parametrize("loss", ["ce", "sampled"])
def test_the_loss_sees_the_counts_without_the_predicted_pair(loss: str) -> None:
    """Against a reference built from brute-force counts with the predicted pair taken out: the full
    softmax for ce, the same drawn negatives (same seed) for sampled softmax."""
    torch.manual_seed(0)
    encoder = make_encoder("mamba", n_items=5)
    head = head_with_prior()
    head.loss_type, head.n_negatives, head.logq = loss, 6, False
    hidden = torch.randn(4, encoder.d_model)
    inputs, targets = torch.tensor([1, 1, 3, 2]), torch.tensor([2, 3, 5, 4])
    counts = brute_counts()[inputs]
    rows = torch.arange(4)
    counts[rows, targets] -= counts[rows, targets].clamp(max=1)
    scores = encoder.score_all(hidden) + 0.8 * counts.log1p()
    if loss == "ce":
        expected = F.cross_entropy(scores[:, 1:], targets - 1)
    else:
        torch.manual_seed(7)
        probs = torch.full((6,), 0.2)
        probs[0] = 0.0
        negatives = torch.multinomial(probs, 6, replacement=True)
        prior = brute_counts().log1p()[inputs][:, negatives]
        negative_scores = encoder.score_all(hidden)[:, negatives] + 0.8 * prior
        negative_scores = negative_scores.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
        logits = torch.cat([scores[rows, targets][:, None], negative_scores], dim=1)
        expected = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
        torch.manual_seed(7)
    # each row has just seen its input; its own target is left out of the counts
    history = History(inputs[:, None], rows, torch.zeros(4, dtype=torch.long), inputs, targets)
    got = head.loss(encoder, hidden, targets, history)
    torch.testing.assert_close(got.detach(), expected.detach())
    got.backward()
    assert head.transition_weight.grad is not None and head.transition_weight.grad != 0
    with pytest.raises(RecsysError, match="History"):
        head.loss(encoder, hidden, targets)


def test_history_carries_the_items_just_before_each_scored_position() -> None:
    items = torch.tensor([[4, 1, 2, 3, 0], [5, 0, 0, 0, 0]])
    causal = History.causal(items, items > 0)
    assert causal.earlier.tolist() == [[0, 0, 0], [4, 0, 0], [1, 4, 0], [2, 1, 4], [0, 0, 0]]
    assert History.last(items).earlier.tolist() == [[2, 1, 4], [0, 0, 0]]
    assert causal.subset(torch.tensor([False, True, False, True, False])).earlier.tolist() == [
        [4, 0, 0],
        [2, 1, 4],
    ]


def test_each_lag_adds_its_own_weight_times_the_counts_of_the_item_that_far_back() -> None:
    """Lag 1 leaves the predicted pair out; lags 2 and 3 read the table as it is (the pair being
    predicted is not a consecutive pair of the row, so the table holds it only from other rows)."""
    torch.manual_seed(0)
    encoder = make_encoder("mamba", n_items=5)
    head = NextItemHead(transition_prior=True, transition_lags=3)
    head.attach_transitions(TransitionTable(5, SOURCES, TARGETS))
    with torch.no_grad():
        head.transition_weight.fill_(0.8)
        head.earlier_transition_weights.copy_(torch.tensor([0.5, -0.3]))
    items = torch.tensor([[3, 1, 1, 2], [2, 1, 0, 0]])
    logs = brute_counts().log1p()
    hidden = torch.randn(2, encoder.d_model)
    expected = encoder.score_all(hidden) + 0.8 * logs[[2, 1]] + 0.5 * logs[[1, 2]] - 0.3 * logs[[1, 0]]
    torch.testing.assert_close(head.rank_scores(encoder, hidden, History.last(items)), expected)

    targets = torch.tensor([[1, 1, 2, 0], [1, 0, 0, 0]])
    history = History.causal(items, targets > 0, targets)
    rows_hidden = torch.randn(4, encoder.d_model)
    flat_targets = targets[targets > 0]
    last, back2, back3 = torch.tensor([3, 1, 1, 2]), torch.tensor([0, 3, 1, 0]), torch.tensor([0, 0, 3, 0])
    lag1 = brute_counts()[last]
    lag1[torch.arange(4), flat_targets] -= 1
    prior = 0.8 * lag1.clamp(min=0).log1p() + 0.5 * logs[back2] - 0.3 * logs[back3]
    scores = encoder.score_all(rows_hidden) + prior
    got = head.loss(encoder, rows_hidden, flat_targets, history)
    torch.testing.assert_close(got, F.cross_entropy(scores[:, 1:], flat_targets - 1))
    got.backward()
    assert (head.earlier_transition_weights.grad != 0).all()
    with pytest.raises(RecsysError, match="earlier"):
        head.rank_scores(encoder, hidden, History(items, torch.arange(2), torch.tensor([3, 1]), items[:, 0]))


@pytest.mark.parametrize("lags", [0, 5, 2.0, True])
def test_transition_lags_out_of_range_are_refused(lags) -> None:
    with pytest.raises(RecsysError, match="transition_lags"):
        NextItemHead(transition_prior=True, transition_lags=lags)


def test_without_the_prior_the_lags_add_nothing() -> None:
    head = NextItemHead(transition_lags=3)
    assert head.earlier_transition_weights is None and not head.uses_history
