"""The user-level bootstrap and the paired permutation test."""

from __future__ import annotations

import numpy as np
import pytest

from recsys_mamba.evaluation.stats import (
    PermutationTest,
    bootstrap,
    paired_permutation,
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


def _mean_of(key: str):
    return lambda arrays: {"mean": float(arrays[key].mean())}


def test_permutation_test_finds_a_real_difference_and_reports_p_below_one_over_n() -> None:
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(300), 2)
    first = {"users": users, "hit": rng.random(600) < 0.3}
    other = {"users": users, "hit": rng.random(600) < 0.6}
    test = paired_permutation(_mean_of("hit"), first, other, users, n_permutations=200, seed=0)["mean"]
    assert test.extreme == 0 and test.n == 200
    assert test.p_value == pytest.approx(1 / 201)  # never 0: 200 permutations cannot show less
    assert test.text() == "p < 0.005"


def test_permutation_test_of_equal_models_is_not_significant_and_reproducible() -> None:
    rng = np.random.default_rng(1)
    users = rng.integers(0, 100, 500)
    first = {"users": users, "hit": rng.random(500) < 0.4}
    other = {"users": users, "hit": rng.random(500) < 0.4}
    runs = [paired_permutation(_mean_of("hit"), first, other, users, 300, seed=3)["mean"] for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0].p_value > 0.05 and runs[0].text().startswith("p = ")
    same = paired_permutation(_mean_of("hit"), first, first, users, 50, seed=3)["mean"]
    assert same.diff == 0 and same.p_value == 1.0


def test_permutation_swaps_whole_users_and_every_array() -> None:
    """A metric that is not a per-sample mean (here: max over samples) is tested too, and a user's
    samples always move together."""
    users = np.array([0, 0, 1, 1, 2])
    first = {"users": users, "score": np.zeros((5, 2))}
    other = {"users": users, "score": np.ones((5, 2))}
    seen = []

    def metrics(arrays):
        per_user = {u: set(arrays["score"][users == u, 0]) for u in range(3)}
        assert all(len(v) == 1 for v in per_user.values())  # never split within a user
        seen.append(arrays["score"].shape)
        return {"max": float(arrays["score"].max())}

    test = paired_permutation(metrics, first, other, users, 20, seed=0)["max"]
    assert test.diff == 1.0 and all(shape == (5, 2) for shape in seen)


def test_p_value_of_nan_difference_is_nan() -> None:
    assert np.isnan(PermutationTest(float("nan"), 0, 10).p_value)
    assert PermutationTest(float("nan"), 0, 10).text() == "p = n/a"
