"""Rebuild a trained encoder + head from a checkpoint and the config its run saved beside it."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from recsys_mamba.config import register_resolvers
from recsys_mamba.data.format import ITEM_MAP, load_item_attributes, load_manifest
from recsys_mamba.errors import RecsysError
from recsys_mamba.models.base import SequenceEncoder
from recsys_mamba.models.transitions import TransitionTable
from recsys_mamba.training.checkpoint import check_expected, check_targets, load_checkpoint


@dataclass
class ScoringModel:
    encoder: SequenceEncoder
    head: torch.nn.Module
    task: str
    max_len: int
    prepared: Path
    manifest: dict[str, Any]
    item_ids: np.ndarray  # original item id (str) by item_idx; [0] is padding
    item_category: np.ndarray  # category_idx by item_idx
    item_count: np.ndarray  # training interactions by item_idx
    id_to_idx: dict[str, int] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def event_type_names(self) -> list[str]:
        return [str(n) for n in self.manifest.get("event_types") or []]


def run_config(ckpt: Path) -> DictConfig:
    """The config `train` wrote into the run folder (<run>/config.yaml; ckpt in <run>/checkpoints)."""
    for folder in (ckpt.parent.parent, ckpt.parent):
        config = folder / "config.yaml"
        if config.is_file():
            register_resolvers()
            cfg = OmegaConf.load(config)
            if not isinstance(cfg, DictConfig):
                raise RecsysError(f"{config} is not a run config (a YAML mapping); restore train's one")
            check_targets(cfg, config)
            return cfg
    raise RecsysError(
        f"no config.yaml beside checkpoint {ckpt} (looked in {ckpt.parent.parent} and {ckpt.parent}); "
        "score checkpoints written by python -m recsys_mamba.train, kept inside their run folder"
    )


def prepared_folder(cfg: DictConfig, prepared: str | None) -> Path:
    """The given prepared folder, else the one the run trained on (its prepared_dir or the data cache)."""
    if prepared:
        return Path(prepared)
    if cfg.datamodule.get("prepared_dir"):
        return Path(cfg.datamodule.prepared_dir)
    from recsys_mamba.data import prepare

    data = OmegaConf.to_container(cfg.data, resolve=True)
    return Path(prepare(data, cache_dir=OmegaConf.select(cfg, "paths.cache_dir")))


def read_checkpoint(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checkpoint's weights and metadata, read without unpickling code."""
    if not ckpt.is_file():
        raise RecsysError(
            f"ckpt_path={ckpt} does not exist; pass a .ckpt file, e.g. <run>/checkpoints/last.ckpt"
        )
    return load_checkpoint(ckpt)


def _attribute_input(folder: Path) -> dict[str, torch.Tensor]:
    table = load_item_attributes(folder)
    return {} if table is None else {"item_attributes": torch.from_numpy(table)}


def _submodule_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_model(
    ckpt_path: str | Path, prepared: str | None = None, max_len: int | None = None
) -> ScoringModel:
    ckpt = Path(ckpt_path)
    state, meta = read_checkpoint(ckpt)
    cfg = run_config(ckpt)
    folder = prepared_folder(cfg, prepared)
    manifest = load_manifest(folder)
    n_items = int(manifest["n_items"])
    expect = {
        "task": str(cfg.task.name),
        "model_target": OmegaConf.select(cfg, "model._target_", default=None),
        "n_items": n_items,
        "data_config_hash": manifest.get("config_hash"),
    }
    check_expected(ckpt, meta, expect)
    trained = state.get("encoder.item_emb.weight")
    if trained is None or trained.shape[0] - 1 != n_items:
        got = None if trained is None else trained.shape[0] - 1
        raise RecsysError(
            f"checkpoint {ckpt} was trained on {got} items but the prepared data at {folder} has {n_items}: "
            "it belongs to another data set; pass prepared=<the folder it was trained on>"
        )
    encoder = instantiate(cfg.model)
    if isinstance(encoder, functools.partial):
        encoder = encoder(
            n_items=n_items,
            n_categories=int(manifest.get("n_categories") or 0),
            n_event_types=int(manifest.get("n_event_types") or 0),
            **_attribute_input(folder),
        )
    head = instantiate(cfg.head)
    if isinstance(head, functools.partial):
        head = head(**({} if "d_model" in head.keywords else {"d_model": encoder.d_model}))
    if getattr(head, "transition_weight", None) is not None:
        # the training data's transition counts travel in the checkpoint; size the table to load them
        saved = state.get("head.transitions.keys")
        head.attach_transitions(TransitionTable.empty(n_items, 0 if saved is None else saved.numel()))
    try:
        encoder.load_state_dict(_submodule_state(state, "encoder."))
        head.load_state_dict(_submodule_state(state, "head."))
    except RuntimeError as err:
        raise RecsysError(
            f"checkpoint {ckpt} does not fit the model its config.yaml describes: {err}"
        ) from err
    encoder.eval()
    head.eval()
    items = pl.read_parquet(folder / ITEM_MAP).sort("item_idx")
    idx = items["item_idx"].to_numpy()
    item_ids = np.full(n_items + 1, "", dtype=object)
    item_ids[idx] = items["item_id"].cast(pl.String).to_numpy()
    category = np.zeros(n_items + 1, dtype=np.int64)
    category[idx] = items["category_idx"].to_numpy()
    count = np.zeros(n_items + 1, dtype=np.float64)
    count[idx] = items["count"].to_numpy()
    return ScoringModel(
        encoder=encoder,
        head=head,
        task=str(cfg.task.name),
        max_len=int(max_len or cfg.model.max_len),
        prepared=folder,
        manifest=manifest,
        item_ids=item_ids,
        item_category=category,
        item_count=count,
        id_to_idx={str(v): int(i) for i, v in zip(idx, item_ids[idx], strict=True)},
    )
