"""Seeded generator of realistic behaviour logs: impressions with clicks and pv/cart/fav/buy depth.

The model behind it, so a sequence model has something real to learn beyond popularity:
- items belong to categories, have a latent quality and a power-law exposure popularity;
- each user has long-term category tastes and a current interest category that drifts (more often
  across session breaks);
- the recommender shows items mostly from the current interest, sometimes from the user's other
  tastes, sometimes globally popular ones;
- the click probability depends on the match with the current interest, the user's recent click
  categories and the item quality, and not on popularity; clicked items get a depth
  (pv, or cart/fav/buy, likelier for good items), skipped ones are `expose` events with label 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys_mamba.data.cache import atomic_folder, content_hash

EVENT_TYPES = ["expose", "pv", "cart", "fav", "buy"]
LOG_FILE = "events.parquet"

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "n_users": 3000,
    "n_items": 2000,
    "n_categories": 24,
    "mean_events": 60,
    "min_events": 12,
    "max_events": 300,
    "pop_exponent": 0.8,
    "taste_concentration": 0.25,
    "drift": 0.05,
    "session_drift": 0.5,
    "session_break": 0.08,
    "p_current_interest": 0.5,
    "p_other_tastes": 0.25,
    "ctr_bias": -2.0,
    "interest_weight": 1.6,
    "recent_weight": 1.5,
    "quality_weight": 0.8,
    "start_time": 1_600_000_000,
    "days": 60,
}


def _categorical_rows(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of a matrix of probabilities."""
    cum = probs.cumsum(axis=1)
    u = rng.random(len(probs))[:, None] * cum[:, -1:]
    return np.minimum((cum <= u).sum(axis=1), probs.shape[1] - 1)


class _Catalogue:
    """Items with categories, quality and popularity, sampled by popularity within a category."""

    def __init__(self, rng: np.random.Generator, p: dict[str, Any]) -> None:
        n, c = p["n_items"], p["n_categories"]
        self.category = np.sort(rng.choice(c, size=n, p=rng.dirichlet(np.full(c, 2.0))))
        self.quality = rng.normal(size=n)
        rank = rng.permutation(n) + 1.0
        weight = rank ** -p["pop_exponent"] * np.exp(0.3 * self.quality)
        self.cdf = np.cumsum(weight)
        starts = np.searchsorted(self.category, np.arange(c))
        ends = np.searchsorted(self.category, np.arange(c), side="right")
        padded = np.concatenate([[0.0], self.cdf])
        self.lo, self.hi = padded[starts], padded[ends]
        # an empty category falls back to the whole catalogue
        empty = ends == starts
        self.lo[empty], self.hi[empty] = 0.0, self.cdf[-1]

    def sample(self, rng: np.random.Generator, categories: np.ndarray, anywhere: np.ndarray) -> np.ndarray:
        lo = np.where(anywhere, 0.0, self.lo[categories])
        hi = np.where(anywhere, self.cdf[-1], self.hi[categories])
        x = lo + rng.random(len(categories)) * (hi - lo)
        return np.minimum(np.searchsorted(self.cdf, x, side="right"), len(self.cdf) - 1)


def generate(params: dict[str, Any] | None = None) -> pl.DataFrame:
    """The log as a DataFrame (user_id, item_id, category, event_type, label, timestamp), time order."""
    p = {**DEFAULTS, **(params or {})}
    rng = np.random.default_rng(p["seed"])
    items = _Catalogue(rng, p)
    n_users, n_cat = p["n_users"], p["n_categories"]
    tastes = rng.dirichlet(np.full(n_cat, p["taste_concentration"]), size=n_users)
    sigma = 0.7
    lengths = rng.lognormal(np.log(p["mean_events"]) - sigma**2 / 2, sigma, size=n_users)
    lengths = np.clip(lengths.astype(np.int64), p["min_events"], p["max_events"])
    interest = _categorical_rows(rng, tastes)
    recent = np.zeros((n_users, n_cat))
    clock = p["start_time"] + rng.random(n_users) * p["days"] * 86400 * 0.5
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("user", "item", "click", "depth", "time")}
    for step in range(int(lengths.max())):
        users = np.flatnonzero(lengths > step)
        n = len(users)
        new_session = rng.random(n) < p["session_break"]
        clock[users] += np.where(new_session, rng.exponential(86400.0, n), rng.exponential(45.0, n)) + 1
        drift = rng.random(n) < np.where(new_session, p["session_drift"], p["drift"])
        interest[users[drift]] = _categorical_rows(rng, tastes[users[drift]])
        source = rng.random(n)
        other = _categorical_rows(rng, tastes[users])
        shown_cat = np.where(source < p["p_current_interest"], interest[users], other)
        anywhere = source >= p["p_current_interest"] + p["p_other_tastes"]
        item = items.sample(rng, shown_cat, anywhere)
        cat = items.category[item]
        logit = (
            p["ctr_bias"]
            + p["interest_weight"] * (cat == interest[users])
            + p["recent_weight"] * recent[users, cat]
            + p["quality_weight"] * items.quality[item]
        )
        click = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
        deep = click & (rng.random(n) < 1.0 / (1.0 + np.exp(2.0 - 0.8 * items.quality[item])))
        depth = np.where(deep, rng.choice([2, 3, 4], size=n, p=[0.45, 0.3, 0.25]), click.astype(np.int64))
        clicked = users[click]
        recent[clicked] *= 0.8
        recent[clicked, cat[click]] += 0.2
        for key, value in zip(parts, (users, item, click, depth, clock[users].copy()), strict=True):
            parts[key].append(value)
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    user_ids = rng.choice(np.arange(10_000, 10_000 + 20 * n_users), size=n_users, replace=False)
    item_ids = rng.choice(np.arange(100_000, 100_000 + 20 * p["n_items"]), size=p["n_items"], replace=False)
    return pl.DataFrame(
        {
            "user_id": user_ids[cols["user"]],
            "item_id": item_ids[cols["item"]],
            "category": items.category[cols["item"]].astype(np.int64) + 1,
            "event_type": np.array(EVENT_TYPES)[cols["depth"]],
            "label": cols["click"].astype(np.int8),
            "timestamp": cols["time"].astype(np.int64),
        }
    ).sort("timestamp", maintain_order=True)


def ensure_log(params: dict[str, Any] | None, cache_dir: Path) -> Path:
    """Path of the generated log for `params` in the cache, generating it once."""
    p = {**DEFAULTS, **(params or {})}
    folder = Path(cache_dir) / f"synthetic-log-{content_hash(p)}"
    if not (folder / LOG_FILE).is_file():
        with atomic_folder(folder) as work:
            generate(p).write_parquet(work / LOG_FILE)
    return folder / LOG_FILE
