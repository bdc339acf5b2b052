"""Shared fixtures: small encoders of every registered kind and a tiny real batch from ML-100K."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest
import torch

from recsys_mamba.models import GRU4RecEncoder, MambaEncoder, SASRecEncoder, SequenceEncoder

ENCODERS = {"mamba": MambaEncoder, "sasrec": SASRecEncoder, "gru4rec": GRU4RecEncoder}

REPO_ROOT = Path(__file__).resolve().parents[2]

# Small but complete configurations: every code path (side features, several layers) is exercised.
SMALL = {
    "mamba": {"d_model": 16, "n_layers": 2, "d_state": 8, "dropout": 0.0},
    "sasrec": {"d_model": 16, "n_layers": 2, "n_heads": 2, "dropout": 0.0},
    "gru4rec": {"d_model": 16, "n_layers": 2, "dropout": 0.0},
}


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: intra-op threads only add contention on a shared 2-core machine
    (a step took 40x longer with 2 threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_encoder(name: str, n_items: int = 30, **overrides) -> SequenceEncoder:
    torch.manual_seed(0)
    kwargs = {"n_categories": 5, "n_event_types": 3, "max_len": 64, **SMALL[name], **overrides}
    return ENCODERS[name](n_items=n_items, **kwargs).eval()


@pytest.fixture(params=sorted(ENCODERS))
def encoder_name(request: pytest.FixtureRequest) -> str:
    return request.param


def random_batch(n_items: int = 30, lengths: tuple[int, ...] = (12, 7, 3, 1), width: int = 12, seed: int = 0):
    """Right-padded items, categories and event types with the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    shape = (len(lengths), width)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    items = torch.randint(1, n_items + 1, shape, generator=g) * mask
    categories = torch.randint(1, 6, shape, generator=g) * mask
    event_types = torch.randint(1, 4, shape, generator=g) * mask
    return items, categories, event_types


def shared_data_dir() -> Path:
    return Path(os.environ.get("RECSYS_SHARED_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def ml100k() -> pl.DataFrame:
    """MovieLens-100K ratings (user, item, rating, ts), read in place; skips when the data is absent."""
    path = shared_data_dir() / "ml-100k" / "u.data"
    if not path.is_file():
        pytest.skip(
            f"real data not found at {path}; set RECSYS_SHARED_DATA_DIR or put shared/data beside the repo"
        )
    return pl.read_csv(
        path, separator="\t", has_header=False, new_columns=["user", "item", "rating", "ts"]
    ).sort(["user", "ts", "item"])


def user_sequences(
    ratings: pl.DataFrame, n_users: int, length: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The first `length` events of the first `n_users` users with that many, items and ratings as
    (n_users, length) tensors; item ids remapped to 1..n_items over this batch."""
    seqs = (
        ratings.group_by("user", maintain_order=True)
        .agg(pl.col("item").head(length), pl.col("rating").head(length))
        .filter(pl.col("item").list.len() == length)
        .head(n_users)
    )
    raw = torch.tensor(seqs["item"].to_list())
    ids, items = torch.unique(raw, return_inverse=True)
    return items + 1, torch.tensor(seqs["rating"].to_list()), len(ids)
