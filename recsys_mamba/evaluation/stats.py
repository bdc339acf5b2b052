"""User-level statistics: bootstrap confidence intervals, and a paired permutation test between models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MetricFn = Callable[[np.ndarray], dict[str, float]]
Arrays = dict[str, np.ndarray]


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


@dataclass(frozen=True)
class PermutationTest:
    """A two-sided paired permutation test of one metric: `extreme` of the `n` permutations gave a
    difference at least as large (in absolute value) as the observed one."""

    diff: float
    extreme: int
    n: int

    @property
    def p_value(self) -> float:
        """(extreme + 1) / (n + 1): never 0, as a p-value estimated from n permutations must not be."""
        if not np.isfinite(self.diff) or self.n == 0:
            return float("nan")
        return (self.extreme + 1) / (self.n + 1)

    def text(self) -> str:
        """`p = 0.034`, or `p < 0.001` (below 1/n) when no permutation was as extreme."""
        return p_text(self.p_value, self.extreme, self.n)


def p_text(p_value: float, extreme: int, n: int) -> str:
    if not np.isfinite(p_value):
        return "p = n/a"
    if extreme == 0:
        return f"p < {1 / n:.2g}"
    return f"p = {p_value:.3f}"


def _swap(a: Arrays, b: Arrays, flip: np.ndarray) -> tuple[Arrays, Arrays]:
    """The two models' per-sample arrays with the samples of flipped users exchanged."""
    out_a, out_b = {}, {}
    for key, va in a.items():
        vb = b[key]
        mask = flip.reshape(-1, *([1] * (va.ndim - 1)))
        out_a[key], out_b[key] = np.where(mask, vb, va), np.where(mask, va, vb)
    return out_a, out_b


def paired_permutation(
    metrics: Callable[[Arrays], dict[str, float]],
    first: Arrays,
    other: Arrays,
    users: np.ndarray,
    n_permutations: int,
    seed: int,
) -> dict[str, PermutationTest]:
    """Two-sided paired permutation test of every metric between two models scored on the same samples.

    Under "no difference", which model produced a user's outputs is arbitrary: each permutation swaps
    the two models' outputs for a random half of the users (all of a user's samples together) and
    recomputes every metric, so the test holds for metrics that are not per-user means too (AUC, ECE).
    `metrics(arrays)` gives the metrics of one model's index-aligned arrays; the difference tested is
    other - first.
    """
    observed_first, observed_other = metrics(first), metrics(other)
    observed = {k: observed_other[k] - observed_first[k] for k in observed_first}
    _, user_of_sample = np.unique(users, return_inverse=True)
    n_users = int(user_of_sample.max()) + 1 if len(users) else 0
    rng = np.random.default_rng(seed)
    extreme = dict.fromkeys(observed, 0)
    for _ in range(n_permutations):
        flip = rng.random(n_users) < 0.5
        a, b = _swap(first, other, flip[user_of_sample])
        ma, mb = metrics(a), metrics(b)
        for key, diff in observed.items():
            permuted = mb[key] - ma[key]
            # A relative tolerance: the observed split itself must count as "as extreme" despite rounding.
            if np.isfinite(permuted) and abs(permuted) >= abs(diff) * (1 - 1e-9) - 1e-12:
                extreme[key] += 1
    return {key: PermutationTest(diff, extreme[key], n_permutations) for key, diff in observed.items()}
