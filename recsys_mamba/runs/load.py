"""A trained run, loaded for inference without Lightning: its config, its prepared data and the model
with the checkpoint's weights, every piece checked against the others."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from recsys_mamba.config import register_resolvers
from recsys_mamba.errors import RecsysError
from recsys_mamba.models.model import RecModel
from recsys_mamba.models.transitions import TransitionTable
from recsys_mamba.runs.build import build_model
from recsys_mamba.runs.checkpoint import check_expected, check_targets, load_checkpoint
from recsys_mamba.sequences.prepared import PreparedData
from recsys_mamba.tasks import Task, get_task
from recsys_mamba.tasks.base import DataSettings, HeadInputs

CONFIG = "config.yaml"


@dataclass
class Run:
    """A checkpoint ready to score: `model` is in eval mode on the CPU."""

    ckpt_path: Path
    config: DictConfig
    metadata: dict[str, Any]
    task: Task
    data: PreparedData
    model: RecModel
    max_len: int

    def data_settings(self) -> DataSettings:
        """How the run cut its data into samples (its `datamodule` settings)."""
        return data_settings(self.config, self.max_len)


def data_settings(cfg: DictConfig, max_len: int | None = None) -> DataSettings:
    dm = cfg.datamodule
    return DataSettings(
        max_len=int(max_len or dm.max_len),
        positive_targets=bool(dm.get("positive_targets", True)),
        next_item_windows=bool(dm.get("next_item_windows", True)),
        ctr_train_windows=bool(dm.get("ctr_train_windows", True)),
    )


def run_folder(ckpt_path: Path) -> Path:
    """`<run>/checkpoints/x.ckpt` -> `<run>` (where train wrote config.yaml and metrics.json)."""
    return ckpt_path.resolve().parent.parent


def run_config(ckpt: Path) -> DictConfig:
    """The config `train` wrote into the run folder (<run>/config.yaml with the checkpoint in
    <run>/checkpoints, or beside the checkpoint)."""
    for folder in (run_folder(ckpt), ckpt.resolve().parent):
        config = folder / CONFIG
        if config.is_file():
            register_resolvers()
            cfg = OmegaConf.load(config)
            if not isinstance(cfg, DictConfig):
                raise RecsysError(f"{config} is not a run config (a YAML mapping); restore train's one")
            # Only the model and the head are instantiated here; nothing else of the file may run code.
            for key in ("model", "head"):
                if key in cfg:
                    check_targets(cfg[key], config, at=key)
            return cfg
    raise RecsysError(
        f"no config.yaml beside checkpoint {ckpt} (looked in {run_folder(ckpt)} and "
        f"{ckpt.resolve().parent}); score checkpoints written by python -m recsys_mamba.train, kept inside "
        "their run folder"
    )


def prepared_folder(cfg: DictConfig, prepared: str | Path | None = None) -> Path:
    """The given prepared folder, else the one the run trained on (its prepared_dir or the data cache)."""
    if prepared:
        return Path(prepared)
    if cfg.datamodule.get("prepared_dir"):
        return Path(cfg.datamodule.prepared_dir)
    from recsys_mamba.data import prepare

    data = OmegaConf.to_container(cfg.data, resolve=True)
    return Path(prepare(data, cache_dir=OmegaConf.select(cfg, "paths.cache_dir")))


def _submodule_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_run(ckpt_path: str | Path, prepared: str | Path | None = None, max_len: int | None = None) -> Run:
    """The checkpoint's model with its weights, its run config and its prepared data (or `prepared`),
    refused with a message where they do not belong together."""
    ckpt = Path(ckpt_path)
    if not ckpt.is_file():
        raise RecsysError(
            f"ckpt_path={ckpt} does not exist; pass a .ckpt file, e.g. <run>/checkpoints/last.ckpt"
        )
    state, meta = load_checkpoint(ckpt)
    cfg = run_config(ckpt)
    data = PreparedData.open(prepared_folder(cfg, prepared))
    n_items = data.sizes["n_items"]
    expect = {
        "task": str(cfg.task.name),
        "model_target": OmegaConf.select(cfg, "model._target_", default=None),
        "n_items": n_items,
        "data_config_hash": data.manifest.get("config_hash"),
    }
    check_expected(ckpt, meta, expect)
    trained = state.get("encoder.item_emb.weight")
    if trained is None or trained.shape[0] - 1 != n_items:
        got = None if trained is None else trained.shape[0] - 1
        raise RecsysError(
            f"checkpoint {ckpt} was trained on {got} items but the prepared data at {data.folder} has "
            f"{n_items}: it belongs to another data set; pass prepared=<the folder it was trained on>"
        )
    # The training data's transition counts travel in the checkpoint: size the table to load them.
    saved_pairs = state.get("head.transitions.keys")
    n_pairs = 0 if saved_pairs is None else saved_pairs.numel()
    # So are the user embeddings of a head that has them: as many as the training data had users.
    user_emb = state.get("head.user_emb.weight")
    inputs = HeadInputs(
        transitions=lambda: TransitionTable.empty(n_items, n_pairs),
        n_users=None if user_emb is None else (lambda: user_emb.shape[0] - 1),
    )
    model = build_model(cfg, data.encoder_inputs(), inputs)
    try:
        model.encoder.load_state_dict(_submodule_state(state, "encoder."))
        model.head.load_state_dict(_submodule_state(state, "head."))
    except RuntimeError as err:
        raise RecsysError(
            f"checkpoint {ckpt} does not fit the model its config.yaml describes: {err}"
        ) from err
    model.eval()
    task = get_task(str(cfg.task.name))
    return Run(ckpt, cfg, meta, task, data, model, int(max_len or cfg.model.max_len))
