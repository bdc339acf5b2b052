"""Calibration error and user-level bootstrap: confidence intervals and paired tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MetricFn = Callable[[np.ndarray], dict[str, float]]


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


def user_draws(users: np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """`n_boot` resamples of the users (with replacement), each as the sample indices of the drawn users."""
    order = np.argsort(users, kind="stable")
    uniq, starts, counts = np.unique(users[order], return_index=True, return_counts=True)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(uniq), len(uniq))
        # Sample positions of every drawn user: starts repeated per sample plus the offset within the user.
        lengths = counts[pick]
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        draws.append(order[np.repeat(starts[pick], lengths) + offsets])
    return draws


def bootstrap(fn: MetricFn, draws: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Each metric's value on every resample."""
    runs = [fn(idx) for idx in draws]
    return {key: np.array([r[key] for r in runs], dtype=np.float64) for key in runs[0]}


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def paired_p_value(diffs: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "no difference" from paired resampled differences."""
    finite = diffs[np.isfinite(diffs)]
    if finite.size == 0:
        return float("nan")
    return float(min(1.0, 2 * min(np.mean(finite <= 0), np.mean(finite >= 0))))
