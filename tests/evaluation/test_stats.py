"""The user-level bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from recsys_mamba.evaluation.stats import (
    bootstrap,
    paired_p_value,
    percentile_ci,
    user_draws,
)


def test_draws_resample_whole_users() -> None:
    users = np.array([3, 1, 3, 2, 1, 3])
    for idx in user_draws(users, n_boot=20, seed=0):
        drawn, counts = np.unique(users[idx], return_counts=True)
        per_user = {1: 2, 2: 1, 3: 3}
        assert all(c % per_user[u] == 0 for u, c in zip(drawn, counts, strict=True))
        assert len(idx) >= 3


def test_bootstrap_ci_contains_estimate_and_is_reproducible() -> None:
    rng = np.random.default_rng(1)
    users = rng.integers(0, 50, 400)
    values = rng.normal(1.0, 1.0, 400)

    def fn(idx: np.ndarray) -> dict[str, float]:
        return {"mean": float(values[idx].mean())}

    first = bootstrap(fn, user_draws(users, 100, seed=7))["mean"]
    again = bootstrap(fn, user_draws(users, 100, seed=7))["mean"]
    other = bootstrap(fn, user_draws(users, 100, seed=8))["mean"]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    lo, hi = percentile_ci(first)
    assert lo <= values.mean() <= hi


def test_paired_p_value() -> None:
    assert paired_p_value(np.full(100, 0.1)) == 0.0
    assert paired_p_value(np.linspace(-1, 1, 101)) == pytest.approx(1.0)
