"""User-level bootstrap: confidence intervals and paired tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MetricFn = Callable[[np.ndarray], dict[str, float]]


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
