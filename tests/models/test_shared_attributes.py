"""The shared-attribute table and the head's attribute prior: pairs, ranking, loss, wiring."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from recsys_mamba.errors import RecsysError
from recsys_mamba.models.heads import NextItemHead
from recsys_mamba.models.score_terms import History
from recsys_mamba.models.shared_attributes import shared_attribute_pairs, shared_attribute_table
from recsys_mamba.runs.build import build_head
from recsys_mamba.tasks.base import HeadInputs
from tests.models.conftest import make_encoder


def brute_shared(table: np.ndarray, max_items: int) -> np.ndarray:
    """(n + 1, n + 1) how many attributes held by <= max_items items each pair of items shares."""
    n = table.shape[0] - 1
    holders: dict[int, set[int]] = {}
    for item in range(1, n + 1):
        for attribute in set(table[item].tolist()) - {0}:
            holders.setdefault(attribute, set()).add(item)
    shared = np.zeros((n + 1, n + 1))
    for items in holders.values():
        if len(items) <= max_items:
            for a, b in itertools.permutations(items, 2):
                shared[a, b] += 1
    return shared


def random_attributes(n_items: int = 40, width: int = 4, n_attributes: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    table = rng.integers(1, n_attributes + 1, size=(n_items + 1, width))
    table[rng.random(table.shape) < 0.3] = 0  # padding slots, some items with none at all
    table[0] = 0
    table[5] = [3, 3, 0, 0]  # one attribute listed twice is held once
    return table


@pytest.mark.parametrize("max_items", [2, 5, 1000])
def test_pairs_are_every_ordered_pair_sharing_a_small_enough_attribute(max_items: int) -> None:
    table = random_attributes()
    sources, targets = shared_attribute_pairs(table, max_items)
    got = np.zeros((41, 41))
    np.add.at(got, (sources, targets), 1)
    np.testing.assert_array_equal(got, brute_shared(table, max_items))
    assert (sources != targets).all()
    shared = shared_attribute_table(torch.from_numpy(table), max_items)
    torch.testing.assert_close(shared.dense(torch.arange(41)), torch.from_numpy(got).float().log1p())
    assert shared.state_dict() == {}  # rebuilt from the encoder's attributes, which the weights hold


def test_no_attribute_small_enough_gives_an_empty_table() -> None:
    table = np.array([[0, 0], [1, 0], [1, 0], [1, 0]])
    sources, _ = shared_attribute_pairs(table, 2)
    assert sources.size == 0
    assert (shared_attribute_table(table, 2).dense(torch.arange(4)) == 0).all()


def head_with_attributes(table: np.ndarray, weight: float = 0.6) -> NextItemHead:
    head = NextItemHead(attribute_prior=True, attribute_max_items=6)
    head.attach_attributes(torch.from_numpy(table))
    with torch.no_grad():
        head.attribute_weight.fill_(weight)
    return head


def test_ranking_and_the_loss_add_the_weighted_log_shared_attributes_of_the_current_item() -> None:
    """Nothing is left out in training: the table holds no event, so the target's own pair counts."""
    torch.manual_seed(0)
    table = random_attributes()
    logs = torch.from_numpy(brute_shared(table, 6)).float().log1p()
    encoder, head = make_encoder("mamba", n_items=40), head_with_attributes(table)
    items = torch.tensor([[7, 5, 0], [2, 9, 11]])
    hidden = torch.randn(2, encoder.d_model)
    expected = encoder.score_all(hidden) + 0.6 * logs[[5, 11]]
    torch.testing.assert_close(head.rank_scores(encoder, hidden, History.last(items)), expected)

    targets = torch.tensor([[5, 3, 0], [9, 11, 4]])
    history = History.causal(items, targets > 0, targets)
    rows_hidden = torch.randn(5, encoder.d_model)
    flat = targets[targets > 0]
    scores = encoder.score_all(rows_hidden) + 0.6 * logs[[7, 5, 2, 9, 11]]
    got = head.loss(encoder, rows_hidden, flat, history)
    torch.testing.assert_close(got, F.cross_entropy(scores[:, 1:], flat - 1))
    got.backward()
    assert head.attribute_weight.grad is not None and head.attribute_weight.grad != 0
    assert "attribute_weight" in head.state_dict() and not any("shared" in k for k in head.state_dict())


@pytest.mark.parametrize("max_items", [1, 0, 2.5, True, "300"])
def test_bad_attribute_max_items_are_refused(max_items) -> None:
    with pytest.raises(RecsysError, match="attribute_max_items"):
        NextItemHead(attribute_prior=True, attribute_max_items=max_items)


def test_the_prior_needs_item_attributes_and_says_where_to_set_them() -> None:
    encoder = make_encoder("mamba", n_items=40)
    head = NextItemHead(attribute_prior=True)
    with pytest.raises(RecsysError, match="attach_attributes"):
        head.rank_scores(encoder, torch.randn(1, encoder.d_model), History.last(torch.tensor([[3]])))
    cfg = OmegaConf.create({"_target_": "recsys_mamba.models.heads.NextItemHead", "attribute_prior": True})
    with pytest.raises(RecsysError, match=r"data\.item_attributes"):
        build_head(cfg, encoder, HeadInputs())


def test_build_head_attaches_the_table_from_the_encoders_attributes() -> None:
    table = random_attributes()
    encoder = make_encoder("mamba", n_items=40, item_attributes=torch.from_numpy(table))
    target = "recsys_mamba.models.heads.NextItemHead"
    cfg = OmegaConf.create({"_target_": target, "attribute_prior": True, "attribute_max_items": 6})
    head = build_head(cfg, encoder, HeadInputs())
    expected = torch.from_numpy(brute_shared(table, 6)).float().log1p()
    torch.testing.assert_close(head.shared_attributes.dense(torch.arange(41)), expected)
    assert not NextItemHead().needs_attributes and not NextItemHead().uses_history
