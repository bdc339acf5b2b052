"""Ranking, CTR and calibration metrics: plain torch / numpy (+ scikit-learn for AUC); no data or model
imports."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
import torch

HR_KS: tuple[int, ...] = (1, 5, 10, 20)
NDCG_KS: tuple[int, ...] = (5, 10, 20)
MRR_K: int = 10


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each row's target column among all columns of `scores` (B, N).

    Ties are broken against the target (every other column with an equal score counts as ahead), so
    a model that scores everything the same cannot look good.
    """
    target_scores = scores.gather(1, targets.long().unsqueeze(1))
    ahead = (scores >= target_scores).sum(dim=1) - 1
    # A NaN score compares false with everything and would otherwise rank first.
    ahead = torch.where(target_scores.squeeze(1).isnan(), scores.shape[1] - 1, ahead)
    return ahead + 1


def ranking_metrics(
    ranks: torch.Tensor | np.ndarray,
    hr_ks: Sequence[int] = HR_KS,
    ndcg_ks: Sequence[int] = NDCG_KS,
    mrr_k: int = MRR_K,
) -> dict[str, float]:
    """HR@k, NDCG@k and MRR@k for one relevant item per row, from its 1-based rank."""
    r = torch.as_tensor(ranks, dtype=torch.float64)
    if r.numel() == 0:
        return {}
    out: dict[str, float] = {}
    for k in hr_ks:
        out[f"hr@{k}"] = (r <= k).double().mean().item()
    gain = 1.0 / torch.log2(r + 1.0)
    for k in ndcg_ks:
        out[f"ndcg@{k}"] = torch.where(r <= k, gain, torch.zeros_like(gain)).mean().item()
    out[f"mrr@{mrr_k}"] = torch.where(r <= mrr_k, 1.0 / r, torch.zeros_like(r)).mean().item()
    return out


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present."""
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() == labels.max():
        return float("nan")
    from sklearn.metrics import roc_auc_score  # here: seconds to import, and loading a model imports us

    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Per-user AUC averaged with the user's sample count as weight; users with one class are skipped."""
    frame = pl.DataFrame(
        {
            "user": np.asarray(users),
            "label": np.asarray(labels, dtype=np.int64),
            "score": np.asarray(scores, dtype=np.float64),
        }
    )
    # Mann-Whitney U per user: AUC = (sum of positive ranks - P(P+1)/2) / (P N), ties get average ranks.
    per_user = (
        frame.with_columns(rank=pl.col("score").rank("average").over("user"))
        .group_by("user")
        .agg(n=pl.len(), pos=pl.col("label").sum(), pos_rank=(pl.col("rank") * pl.col("label")).sum())
        .filter((pl.col("pos") > 0) & (pl.col("pos") < pl.col("n")))
    )
    if per_user.height == 0:
        return float("nan")
    n = per_user["n"].to_numpy().astype(np.float64)
    pos = per_user["pos"].to_numpy().astype(np.float64)
    user_auc = (per_user["pos_rank"].to_numpy() - pos * (pos + 1) / 2) / (pos * (n - pos))
    return float(np.average(user_auc, weights=n))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1 - eps])."""
    y = np.asarray(labels, dtype=np.float64)
    if y.size == 0:
        return float("nan")
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def ctr_metrics(users: np.ndarray, labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """AUC, GAUC and LogLoss from raw logits."""
    logits = np.asarray(logits, dtype=np.float64)
    probs = 1.0 / (1.0 + np.exp(-logits))
    return {
        "auc": auc(labels, logits),
        "gauc": gauc(users, labels, logits),
        "logloss": logloss(labels, probs),
    }


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def reliability_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width probability bins: sample count, mean predicted probability and observed rate."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    # The right edge belongs to the last bin, so p = 1.0 is counted.
    which = np.minimum((probs * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(which, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(which, weights=probs, minlength=n_bins) / count
        rate = np.bincount(which, weights=labels, minlength=n_bins) / count
    return {"count": count, "mean_prob": mean_prob, "rate": rate}


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """Sum over bins of |observed rate - mean probability|, weighted by the bin's share of samples."""
    bins = reliability_bins(labels, probs, n_bins)
    total = bins["count"].sum()
    if total == 0:
        return float("nan")
    used = bins["count"] > 0
    gap = np.abs(bins["rate"][used] - bins["mean_prob"][used])
    return float(np.sum(gap * bins["count"][used]) / total)
