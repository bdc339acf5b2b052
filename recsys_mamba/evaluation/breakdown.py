"""Task metrics on one model's outputs: the full set, per-bucket CTR metrics, top-K list statistics."""

from __future__ import annotations

import itertools

import numpy as np

from recsys_mamba.evaluation.scoring import Scored
from recsys_mamba.evaluation.stats import expected_calibration_error
from recsys_mamba.metrics import ctr_metrics, ranking_metrics

KS: tuple[int, ...] = (1, 5, 10, 20)
HIST_EDGES: tuple[int, ...] = (0, 5, 10, 20, 50)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def ctr_all(a: dict[str, np.ndarray], idx: np.ndarray, n_bins: int) -> dict[str, float]:
    out = ctr_metrics(a["users"][idx], a["labels"][idx], a["logits"][idx])
    out["ece"] = expected_calibration_error(a["labels"][idx], sigmoid(a["logits"][idx]), n_bins)
    return out


def ranking_all(ranks: np.ndarray) -> dict[str, float]:
    out = ranking_metrics(ranks, hr_ks=KS, ndcg_ks=KS, mrr_k=KS[-1])
    for k in KS[:-1]:
        out.update(ranking_metrics(ranks, hr_ks=(), ndcg_ks=(), mrr_k=k))
    return out


def metric_fn(model: Scored, n_bins: int):
    """The per-resample metric function of the bootstrap for this model's task."""
    if model.task == "ctr":
        return lambda idx: ctr_all(model.arrays, idx, n_bins)
    return lambda idx: ranking_all(model.arrays["ranks"][idx])


def full_metrics(model: Scored, n_bins: int) -> dict[str, float]:
    """The training module's test metrics, extended (never recomputed) with the report's extra ones."""
    idx = np.arange(len(model.arrays["index"]))
    extended = metric_fn(model, n_bins)(idx)
    if model.task == "next_item":
        extended.update(topk_stats(model))
    return {**extended, **model.metrics}


def topk_stats(model: Scored) -> dict[str, float]:
    """Catalogue coverage and popularity bias (mean training count of recommended vs clicked items)."""
    topk, counts = model.arrays["topk"], model.item_counts
    n_items = len(counts) - 1
    target_pop = float(np.mean(counts[model.arrays["target"]])) or 1.0
    out: dict[str, float] = {}
    for k in KS:
        top = topk[:, :k]
        out[f"coverage@{k}"] = float(np.unique(top).size / max(n_items, 1))
        out[f"pop_bias@{k}"] = float(np.mean(counts[top]) / target_pop)
    return out


def _bucket_rows(model: Scored, labels: list[str], which: np.ndarray, n_bins: int) -> list[dict]:
    rows = []
    for b, label in enumerate(labels):
        idx = np.flatnonzero(which == b)
        if idx.size:
            rows.append({"bucket": label, "n": int(idx.size), **ctr_all(model.arrays, idx, n_bins)})
    return rows


def ctr_buckets(model: Scored, n_bins: int) -> dict[str, list[dict]]:
    """CTR metrics by history length (fixed edges) and by candidate-item popularity (quartiles)."""
    hist = model.extra["hist_len"]
    edges = np.array(HIST_EDGES)
    hist_labels = [f"{lo}-{hi - 1}" for lo, hi in itertools.pairwise(HIST_EDGES)]
    hist_labels.append(f"{HIST_EDGES[-1]}+")
    by_hist = _bucket_rows(model, hist_labels, np.searchsorted(edges, hist, side="right") - 1, n_bins)
    pop = model.item_counts[model.extra["item"]]
    cuts = np.unique(np.quantile(pop, [0.25, 0.5, 0.75]))
    pop_edges = [pop.min(), *cuts, pop.max()]
    pop_labels = [f"{int(lo)}-{int(hi)}" for lo, hi in itertools.pairwise(pop_edges)]
    by_pop = _bucket_rows(model, pop_labels, np.searchsorted(cuts, pop, side="left"), n_bins)
    return {"history_length": by_hist, "item_popularity": by_pop}
