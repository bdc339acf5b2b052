import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, ndcg_score, roc_auc_score

from recsys_mamba.metrics import (
    auc,
    ctr_metrics,
    expected_calibration_error,
    gauc,
    logloss,
    ranking_metrics,
    target_ranks,
)


def test_target_ranks_hand_computed():
    scores = torch.tensor([[float("-inf"), 0.9, 0.1, 0.5], [float("-inf"), 0.2, 0.2, 0.7]])
    # Row 0: target 3 (0.5) is behind 0.9 -> rank 2. Row 1: target 1 ties with column 2 -> counted ahead.
    assert target_ranks(scores, torch.tensor([3, 1])).tolist() == [2, 3]


def test_target_ranks_nan_is_last():
    scores = torch.tensor([[0.0, float("nan"), 0.3]])
    assert target_ranks(scores, torch.tensor([1])).tolist() == [3]


def test_ranking_metrics_hand_computed():
    m = ranking_metrics(torch.tensor([1, 3, 12, 30]))
    assert m["hr@1"] == pytest.approx(0.25)
    assert m["hr@5"] == pytest.approx(0.5)
    assert m["hr@10"] == pytest.approx(0.5)
    assert m["hr@20"] == pytest.approx(0.75)
    assert m["ndcg@5"] == pytest.approx((1.0 + 1.0 / math.log2(4)) / 4)
    assert m["ndcg@20"] == pytest.approx((1.0 + 0.5 + 1.0 / math.log2(13)) / 4)
    assert m["mrr@10"] == pytest.approx((1.0 + 1.0 / 3) / 4)


def test_ndcg_matches_sklearn():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(64, 40))
    targets = rng.integers(0, 40, size=64)
    ranks = target_ranks(torch.tensor(scores), torch.tensor(targets))
    relevance = np.zeros_like(scores)
    relevance[np.arange(64), targets] = 1.0
    for k in (5, 10, 20):
        expected = np.mean([ndcg_score(relevance[i : i + 1], scores[i : i + 1], k=k) for i in range(64)])
        assert ranking_metrics(ranks)[f"ndcg@{k}"] == pytest.approx(expected)


def test_auc_and_logloss_match_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=500)
    logits = labels * 0.8 + rng.normal(size=500)
    logits[:50] = 0.0  # ties
    probs = 1 / (1 + np.exp(-logits))
    assert auc(labels, logits) == pytest.approx(roc_auc_score(labels, logits))
    assert logloss(labels, probs) == pytest.approx(log_loss(labels, probs))
    assert math.isnan(auc(np.ones(3), np.zeros(3)))


def test_gauc_matches_per_user_sklearn():
    rng = np.random.default_rng(2)
    users = rng.integers(0, 30, size=800)
    labels = rng.integers(0, 2, size=800)
    scores = np.round(labels * 0.5 + rng.normal(size=800), 1)
    users[users == 7] = 8  # keep at least some skipped users below
    labels[users == 3] = 1
    num, den = 0.0, 0
    for u in np.unique(users):
        sel = users == u
        if labels[sel].min() == labels[sel].max():
            continue
        num += roc_auc_score(labels[sel], scores[sel]) * sel.sum()
        den += sel.sum()
    assert gauc(users, labels, scores) == pytest.approx(num / den)


def test_gauc_hand_computed():
    # user 0: pos 0.9 vs negs 0.1, 0.95 -> AUC 0.5 (3 samples); user 1: perfect (2 samples);
    # user 2: one class, skipped.
    users = np.array([0, 0, 0, 1, 1, 2])
    labels = np.array([1, 0, 0, 1, 0, 1])
    scores = np.array([0.9, 0.1, 0.95, 0.8, 0.2, 0.5])
    assert gauc(users, labels, scores) == pytest.approx((0.5 * 3 + 1.0 * 2) / 5)


def test_ctr_metrics_keys():
    m = ctr_metrics(np.array([0, 0, 1, 1]), np.array([1, 0, 1, 0]), np.array([2.0, -1.0, 0.5, 0.1]))
    assert set(m) == {"auc", "gauc", "logloss"}
    assert m["auc"] == pytest.approx(1.0)


def test_ece_hand_computed() -> None:
    # Bin [0, .5): mean p .2, rate 0 -> gap .2; bin [.5, 1]: mean p .8, rate 2/3 -> gap 2/15.
    labels = np.array([0, 0, 1, 1, 0])
    probs = np.array([0.1, 0.3, 0.6, 1.0, 0.8])
    expected = 0.2 * 2 / 5 + (0.8 - 2 / 3) * 3 / 5
    assert expected_calibration_error(labels, probs, n_bins=2) == pytest.approx(expected)


def test_ece_zero_when_calibrated() -> None:
    assert expected_calibration_error(np.array([0, 1, 0, 1]), np.full(4, 0.5)) == pytest.approx(0.0)
