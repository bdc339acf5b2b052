"""What conf/train.yaml (with its groups) may hold: checked by `train` before any data is read or a model
is built; every error names the key and the fix."""

from __future__ import annotations

import importlib.util
import math

import torch
from hydra.utils import get_class
from omegaconf import DictConfig

from recsys_mamba import checks
from recsys_mamba.data.spec import check_source, normalize
from recsys_mamba.errors import RecsysError
from recsys_mamba.models.schema import HEAD, MODEL
from recsys_mamba.schema import (
    Batches,
    Bool,
    Check,
    Choice,
    Int,
    Num,
    PathTo,
    Relation,
    Rule,
    Schema,
    Seed,
    Text,
)
from recsys_mamba.tasks import get_task
from recsys_mamba.tasks.base import MAX_LEN

PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "64", "64-true")


def _task(cfg: DictConfig) -> None:
    get_task(checks.select(cfg, "task.name"))


def _devices(cfg: DictConfig) -> None:
    precision = str(cfg.trainer.get("precision", "32"))
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    cuda = torch.cuda.is_available()
    if accelerator in ("gpu", "cuda") and not cuda:
        raise RecsysError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible; use trainer=cpu (or ddp_cpu)"
        )
    if precision == "16-mixed" and (accelerator == "cpu" or not cuda):
        raise RecsysError(
            "trainer.precision=16-mixed needs a GPU; on CPU use trainer.precision=bf16-mixed or 32"
        )
    devices = checks.select(cfg, "trainer.devices", default=None)
    if not isinstance(devices, str | list) and devices is not None:
        checks.integer(devices, "trainer.devices", minimum=-1, example=1)


def _static_encoder(cfg: DictConfig) -> None:
    """An encoder that ignores the sequence (model=dnn) is a CTR baseline on the user and item ids:
    without the user id it would be an item-only model, under a name that promises more."""
    target = checks.select(cfg, "model._target_", default=None)
    try:
        uses_sequence = getattr(get_class(str(target)), "uses_sequence", True)
    except Exception:  # an unimportable target is reported where the model is built, with its error
        return
    if uses_sequence:
        return
    if checks.select(cfg, "task.name") != "ctr":
        raise RecsysError(f"model._target_={target} ignores the sequence: it is a baseline for task=ctr only")
    if checks.select(cfg, "head.n_users", default=0) == 0:
        raise RecsysError(
            f"model._target_={target} ignores the sequence, so its head must know the user: "
            "set head.n_users=null"
        )


def _monitors(cfg: DictConfig) -> None:
    task = get_task(checks.select(cfg, "task.name"))
    allowed = {f"val/{m}" for m in task.metric_names}
    for name, cb in (cfg.get("callbacks") or {}).items():
        monitor = cb.get("monitor") if isinstance(cb, DictConfig) else None
        if monitor is not None and monitor not in allowed:
            raise RecsysError(
                f"callbacks.{name}.monitor={monitor!r} is not a validation metric of task={task.name}; "
                f"use one of {sorted(allowed)} (set task.monitor)"
            )


def _optimized_metric(cfg: DictConfig) -> None:
    """A validation metric (its value at the best epoch) or a test metric of the task."""
    task = get_task(checks.select(cfg, "task.name"))
    name = checks.select(cfg, "optimized_metric", default=None)
    if name is None:
        return
    allowed = [f"val/{m}" for m in task.metric_names] + list(task.metric_names)
    if str(name).removeprefix("test/") not in allowed:
        raise RecsysError(
            f"optimized_metric={name!r} is not a metric of task={task.name}; use a validation metric "
            f"(its value at the best epoch: {', '.join(allowed[: len(task.metric_names)])}) or a test one "
            f"({', '.join(task.metric_names)})"
        )


# logger _target_ fragment -> (modules of which it needs one, pip requirement, the extra that has it)
LOGGER_PACKAGES = {
    "TensorBoard": (("tensorboard", "tensorboardX"), "tensorboard", "tracking"),
    "MLFlow": (("mlflow",), "mlflow-skinny", "tracking"),
    "Wandb": (("wandb",), "wandb", None),
}


def _loggers(cfg: DictConfig) -> None:
    for name, lg in (cfg.get("logger") or {}).items():
        target = str(lg.get("_target_", "")) if isinstance(lg, DictConfig) else ""
        for fragment, (modules, requirement, extra) in LOGGER_PACKAGES.items():
            if fragment in target and all(importlib.util.find_spec(m) is None for m in modules):
                how = f"pip install 'recsys-mamba[{extra}]' (or pip install {requirement})"
                raise RecsysError(
                    f"logger.{name} needs the {requirement} package: "
                    f"{how if extra else f'pip install {requirement}'}, or choose logger=csv"
                )


def _data(cfg: DictConfig) -> None:
    """The data config and its input files, unless an already prepared folder is given."""
    if checks.select(cfg, "datamodule.prepared_dir", default=None) is None:
        check_source(normalize(checks.select(cfg, "data")))


def _fast_dev_run(cfg: DictConfig) -> None:
    fast = checks.select(cfg, "trainer.fast_dev_run", default=None)
    if not isinstance(fast, bool):
        checks.integer(fast, "trainer.fast_dev_run", minimum=0, example="true")


def _betas(cfg: DictConfig) -> None:
    betas = checks.select(cfg, "module.optimizer.betas", default=None)
    if betas is None:
        return
    if not isinstance(betas, list) or len(betas) != 2:
        raise RecsysError(f"module.optimizer.betas={betas!r} must be two numbers, e.g. [0.9,0.98]")
    for i, b in enumerate(betas):
        checks.number(b, f"module.optimizer.betas[{i}]", minimum=0, below=1, example=0.9)


def _lengths(key: str) -> Rule:
    return Rule(key, MAX_LEN)


TRAIN = Schema(
    Check(_task),
    Rule("seed", Seed()),
    Rule("train", Bool()),
    Rule("test", Bool()),
    MODEL.under("model"),
    _lengths("datamodule.max_len"),
    _lengths("datamodule.batch_size"),
    _lengths("datamodule.eval_batch_size"),
    Relation(
        ("datamodule.max_len", "model.max_len"),
        lambda dm, model: dm <= (model or math.inf),
        "{k0}={v0} exceeds {k1}={v1}; set them equal (datamodule.max_len follows model.max_len unless "
        "overridden)",
    ),
    HEAD.under("head"),
    Rule("trainer.precision", Choice(PRECISIONS, as_text=True)),
    Check(_devices),
    Check(_monitors),
    Check(_static_encoder),
    Check(_loggers),
    Rule("name", Text(optional=True, example="mamba_lr3e-3")),
    Check(_optimized_metric),
    Rule(
        "ckpt_path",
        PathTo(
            "file", optional=True, empty_is_none=True, what="a .ckpt file, e.g. <run>/checkpoints/last.ckpt"
        ),
    ),
    Rule("trainer.max_epochs", Int(-1, example=20, exclude=(0,))),
    Rule("trainer.min_epochs", Int(0, optional=True)),
    Rule("trainer.gradient_clip_val", Num(minimum=0, optional=True)),
    Rule("trainer.check_val_every_n_epoch", Int(1, optional=True)),
    Rule("trainer.num_sanity_val_steps", Int(-1)),
    Rule("trainer.log_every_n_steps", Int(1, optional=True)),
    [Rule(f"trainer.limit_{split}_batches", Batches()) for split in ("train", "val", "test")],
    Check(_fast_dev_run),
    Rule("trainer.enable_progress_bar", Bool()),
    Rule("module.optimizer.lr", Num(above=0, example=0.001)),
    Rule("module.optimizer.weight_decay", Num(minimum=0), present_only=True),
    Check(_betas),
    Rule("module.loss_weighting", Choice(("batch", "target")), present_only=True),
    Rule("callbacks.ema.decay", Num(minimum=0, below=1, example=0.999), present_only=True),
    [
        Rule(f"module.scheduler.{k}", Num(minimum=0, maximum=1, example=0.1), present_only=True)
        for k in ("warmup_frac", "min_lr_ratio")
    ],
    Rule("datamodule.num_workers", Int(0, 1024)),
    Rule("datamodule.pin_memory", Bool(optional=True), present_only=True),
    [
        Rule(f"datamodule.{k}", Bool(), present_only=True)
        for k in (
            "ctr_train_windows",
            "next_item_windows",
            "positive_targets",
            "bucket_by_length",
            "train_on_valid",
        )
    ],
    # Training on the validation targets leaves no held-out validation metric to pick an epoch by.
    Relation(
        ("datamodule.train_on_valid", "task.name"),
        lambda on, task: not on or task == "next_item",
        "{k0}=true is a next_item protocol ({k1}={v1}): set it to false",
    ),
    Relation(
        ("datamodule.train_on_valid", "callbacks.model_checkpoint.monitor"),
        lambda on, monitor: not on or not monitor,
        "{k0}=true trains on the validation targets, so {v1} is no longer held out to pick the tested "
        "epoch: set {k1}=null (the last epoch is tested), as experiment=bench_beauty_train_on_valid does",
    ),
    Rule("paths.cache_dir", PathTo("out_dir")),
    Rule("datamodule.cache_dir", PathTo("out_dir", optional=True)),
    Rule("datamodule.prepared_dir", PathTo("prepared", optional=True)),
    Check(_data),
)


def validate_config(cfg: DictConfig) -> None:
    """Catch config mistakes before any data is read or a model built; each error names key and fix."""
    TRAIN.validate(cfg)


__all__ = ["PRECISIONS", "TRAIN", "validate_config"]
