"""Score a checkpoint's test split through the training code's own test path (`trainer.test`)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from recsys_mamba.config import register_resolvers
from recsys_mamba.errors import RecsysError
from recsys_mamba.training.checkpoint import check_targets, run_checkpoint_io
from recsys_mamba.training.run import build


@dataclass
class Scored:
    """One model's test outputs, aligned by test-sample index."""

    name: str
    ckpt_path: Path
    task: str
    config: DictConfig
    manifest: dict[str, Any]
    metrics: dict[str, float]  # exactly what the training module computed for the test split
    arrays: dict[str, np.ndarray]  # index, users, and logits/labels (ctr) or ranks/topk (next_item)
    item_counts: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # ctr: hist_len, item per sample
    training_metrics: dict[str, Any] | None = None


def run_folder(ckpt_path: Path) -> Path:
    """`<run>/checkpoints/x.ckpt` -> `<run>` (where train wrote config.yaml and metrics.json)."""
    return ckpt_path.resolve().parent.parent


def load_run_config(ckpt_path: Path) -> DictConfig:
    if not ckpt_path.is_file():
        raise RecsysError(
            f"checkpoint {ckpt_path} does not exist; pass a .ckpt file from a training run, "
            "e.g. ckpt_path=logs/train/runs/<time>/checkpoints/last.ckpt"
        )
    config = run_folder(ckpt_path) / "config.yaml"
    if not config.is_file():
        raise RecsysError(
            f"{config} is missing: the checkpoint {ckpt_path} must sit in a training run folder "
            "(<run>/checkpoints/) next to the config.yaml that train wrote"
        )
    register_resolvers()
    cfg = OmegaConf.load(config)
    if not isinstance(cfg, DictConfig):
        raise RecsysError(f"{config} is not a run config (a YAML mapping); restore the one that train wrote")
    check_targets(cfg, config)
    return cfg


def _model_name(cfg: DictConfig, training: dict[str, Any] | None) -> str:
    if training and training.get("model"):
        return str(training["model"])
    return str(OmegaConf.select(cfg, "model._target_", default="model")).rsplit(".", 1)[-1]


def score(ckpt_path: Path) -> Scored:
    """Rebuild data and model from the run's config and test `ckpt_path` the way `train` does."""
    cfg = load_run_config(ckpt_path)
    # The saved config points output_dir at Hydra's runtime, which does not exist here.
    OmegaConf.update(cfg, "paths.output_dir", str(run_folder(ckpt_path)))
    L.seed_everything(int(cfg.get("seed", 42)), verbose=False)
    dm, module = build(cfg)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=[],
        logger=False,
        devices=1,
        num_nodes=1,
        strategy="auto",
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[run_checkpoint_io(cfg, dm, module)],
    )
    with warnings.catch_warnings():
        # Training-only callbacks (checkpointing, early stopping) are not needed to test the weights.
        warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint")
        trainer.test(module, datamodule=dm, ckpt_path=str(ckpt_path), weights_only=True, verbose=False)
    captured = dict(module.last_outputs.get("test", {}))
    if not captured:
        raise RecsysError(f"the test split of {ckpt_path} produced no samples; nothing to evaluate")
    test = dm.datasets["test"]
    extra: dict[str, np.ndarray] = {}
    if cfg.task.name == "ctr":
        extra = {"hist_len": test.hist_len[captured["index"]], "item": test.items[captured["index"]]}
    else:
        captured["target"] = test.store.flat["items"][test.store.start[test.rows] + test.target_pos][
            captured["index"]
        ]
        captured["users"] = test.store.users[test.rows][captured["index"]]
    metrics_file = run_folder(ckpt_path) / "metrics.json"
    training = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    return Scored(
        name=_model_name(cfg, training),
        ckpt_path=ckpt_path,
        task=str(cfg.task.name),
        config=cfg,
        manifest=dict(dm.manifest),
        metrics=dict(module.last_metrics["test"]),
        arrays=captured,
        item_counts=np.asarray(dm.item_counts),
        extra=extra,
        training_metrics=training,
    )
