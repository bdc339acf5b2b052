"""One tiny trained next-item model per session, and its prepared data as an event log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys_mamba.config import compose

# key -> value, shrunk so training takes a few seconds on one core
TINY = {
    "trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "limit_test_batches": 1},
    "model": {"d_model": 16, "n_layers": 1, "max_len": 20},
    "datamodule": {"batch_size": 32, "eval_batch_size": 64},
    "data.synthetic": {"n_users": 60, "n_items": 50, "n_categories": 4, "mean_events": 15, "max_events": 30},
}
OVERRIDES = [f"{group}.{k}={v}" for group, kv in TINY.items() for k, v in kv.items()] + [
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "data.synthetic.min_events=4",
]


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return train_tiny(tmp_path_factory)


@pytest.fixture(scope="session")
def trained_seen_bias(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return train_tiny(tmp_path_factory, "head.seen_bias=true")


@pytest.fixture(scope="session")
def trained_transitions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return train_tiny(
        tmp_path_factory, "head.transition_prior=true", "head.transition_lags=3", "head.seen_bias=true"
    )


@pytest.fixture(scope="session")
def trained_attributes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Trained with item attributes: item i has "shape" i % 3 and, for every fourth item, "large";
    the head adds the attribute prior. The file covers the generator's whole id range (100,000 + 20
    ids per item), most of it unused."""
    path = tmp_path_factory.mktemp("attributes") / "item_attributes.json"
    ids = range(100_000, 100_000 + 20 * TINY["data.synthetic"]["n_items"])
    table = {str(i): [f"shape{i % 3}"] + (["large"] if i % 4 == 0 else []) for i in ids}
    path.write_text(json.dumps(table))
    return train_tiny(tmp_path_factory, f"data.item_attributes={path}", "head.attribute_prior=true")


@pytest.fixture(scope="session")
def trained_ctr_users(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The user + item embedding DNN (model=dnn): a CTR model whose scores depend on the user id."""
    return train_tiny(tmp_path_factory, "task=ctr", "model=dnn", "head.n_users=null")


def train_tiny(tmp_path_factory: pytest.TempPathFactory, *overrides: str) -> dict[str, Path]:
    from recsys_mamba.training.run import train

    run = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
    paths = [f"paths.output_dir={run}", f"paths.cache_dir={cache}"]
    cfg = compose("train", overrides=[*OVERRIDES, *paths, *overrides])
    train(cfg)
    ckpt = run / "checkpoints" / "last.ckpt"
    prepared = next(p for p in cache.iterdir() if (p / "manifest.json").is_file())
    events = tmp_path_factory.mktemp("events") / "events.parquet"
    from recsys_mamba.scoring.inputs import prepared_events

    prepared_events(prepared).write_parquet(events)
    return {"ckpt": ckpt, "prepared": prepared, "events": events, "cache": cache}
