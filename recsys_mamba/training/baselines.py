"""Popularity baselines on exactly the test samples the model is scored on."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from scipy.sparse import csr_matrix, hstack
from sklearn.linear_model import LogisticRegression

from recsys_mamba.metrics import auc, gauc, logloss, ranking_metrics, target_ranks
from recsys_mamba.training.datamodule import CTRDataset, RecDataModule
from recsys_mamba.training.module import maskable_history


def popularity_baseline(
    dm: RecDataModule, mask_history: bool = False, prefix: str = "baseline_popularity_"
) -> dict[str, float]:
    """Popularity scores on the test samples.

    next_item: every item ranked by its training count. ctr: a sample scored by its item's smoothed
    training click rate (`auc`, `gauc`) and, for reference, by its training count (`count_auc`).
    """
    if dm.task == "ctr":
        return {f"{prefix}{k}": v for k, v in _ctr_popularity(dm).items()}
    counts = torch.as_tensor(dm.item_counts, dtype=torch.float64)
    counts[0] = float("-inf")
    ranks = []
    for batch in dm.test_dataloader():
        scores = counts.expand(len(batch["target"]), -1).clone()
        if mask_history:
            scores.scatter_(1, maskable_history(batch), float("-inf"))
        ranks.append(target_ranks(scores, batch["target"]))
    metrics = ranking_metrics(torch.cat(ranks))
    return {f"{prefix}{k}": metrics[k] for k in ("hr@10", "ndcg@10", "mrr@10")}


def _ctr_popularity(dm: RecDataModule) -> dict[str, float]:
    assert dm.ctr_train is not None
    n = len(dm.item_counts)
    train = dm.ctr_train.group_by("item_idx").agg(
        pl.len().alias("n"), pl.col("label").cast(pl.Float64).sum().alias("clicks")
    )
    prior = float(dm.ctr_train["label"].cast(pl.Float64).mean() or 0.0)
    shows, clicks = np.zeros(n), np.zeros(n)
    shows[train["item_idx"].to_numpy()] = train["n"].to_numpy()
    clicks[train["item_idx"].to_numpy()] = train["clicks"].to_numpy()
    # A Beta prior worth 10 impressions keeps rarely shown items near the global rate.
    rate = (clicks + 10.0 * prior) / (shows + 10.0)
    test: CTRDataset = dm.datasets["test"]
    scores = rate[test.items]
    return {
        "auc": auc(test.labels, scores),
        "gauc": gauc(test.users, test.labels, scores),
        "count_auc": auc(test.labels, dm.item_counts[test.items]),
    }


def bias_baseline(dm: RecDataModule, prefix: str = "baseline_bias_", l2: float = 1.0) -> dict[str, float]:
    """ctr only: a logistic regression on one-hot user and item ids (a user bias plus an item bias).

    The strongest model that ignores the order of events: it knows how often each user clicks and how
    clickable each item is. Users or items unseen in training get only the global intercept.
    """
    if dm.task != "ctr" or dm.ctr_train is None:
        return {}
    n_users = int(dm.datasets["test"].store.row_of_user.size)
    n_items = len(dm.item_counts)

    def features(users: np.ndarray, items: np.ndarray) -> csr_matrix:
        rows = np.arange(len(users))
        ones = np.ones(len(users))
        user = csr_matrix((ones, (rows, np.minimum(users, n_users - 1))), shape=(len(users), n_users))
        item = csr_matrix((ones, (rows, items)), shape=(len(users), n_items))
        return hstack([user, item], format="csr")

    train = dm.ctr_train
    labels = train["label"].to_numpy().astype(np.int64)
    if labels.min() == labels.max():
        return {}
    model = LogisticRegression(C=1.0 / l2, max_iter=500)
    model.fit(features(train["user_idx"].to_numpy(), train["item_idx"].to_numpy()), labels)
    test: CTRDataset = dm.datasets["test"]
    probs = model.predict_proba(features(test.users, test.items))[:, 1]
    return {
        f"{prefix}auc": auc(test.labels, probs),
        f"{prefix}gauc": gauc(test.users, test.labels, probs),
        f"{prefix}logloss": logloss(test.labels, probs),
    }
