"""The train function: validate the config, instantiate data/model/trainer, fit, test, write metrics.json."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
)
from omegaconf import DictConfig, OmegaConf

from recsys_mamba import checks, logs
from recsys_mamba.config import config_dir
from recsys_mamba.errors import RecsysError
from recsys_mamba.files import write_json_atomic
from recsys_mamba.runs.build import build_model
from recsys_mamba.training.checkpoint_io import run_checkpoint_io
from recsys_mamba.training.datamodule import RecDataModule
from recsys_mamba.training.schema import validate_config
from recsys_mamba.version import git_commit, git_dirty

log = logging.getLogger(__name__)

# Keys every metrics.json holds besides the task's test metrics and the baselines.
RUN_KEYS = (
    "task", "model", "name", "seed", "git_commit", "n_params", "epochs", "train_time_s", "epoch_time_s",
    "best_epoch", "epoch_history", "optimized_metric", "optimized_value",
)  # fmt: skip
TRAIN_LOSS = ("train/loss_epoch", "train/loss")  # the epoch's mean training loss, as the module logs it


class RunStats(Callback):
    """Per-epoch wall time, monitored value and every epoch-level metric (training loss, validation
    metrics: the report's training curves); kept in checkpoints so a resumed run reports the whole run."""

    def __init__(self, monitor: str, mode: str) -> None:
        self.monitor, self.mode = monitor, mode
        self.epoch_times: list[float] = []
        self.history: list[tuple[int, float]] = []
        self.epochs: dict[int, dict[str, float]] = {}
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_times.append(time.perf_counter() - self._start)
        loss = next((trainer.callback_metrics[k] for k in TRAIN_LOSS if k in trainer.callback_metrics), None)
        if loss is not None:
            self.epochs.setdefault(trainer.current_epoch, {})["train/loss"] = float(loss)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not on_validation_epoch_end: callbacks run that hook before the module logs the epoch's metrics.
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            self.history.append((trainer.current_epoch, float(value)))
        row = self.epochs.setdefault(trainer.current_epoch, {})
        row.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})

    @property
    def best_epoch(self) -> int | None:
        if not self.history:
            return None
        pick = max if self.mode == "max" else min
        return pick(self.history, key=lambda ev: ev[1])[0]

    def epoch_rows(self) -> list[dict[str, float]]:
        """One row per epoch: `epoch`, `train/loss` and the validation metrics (NaN as None)."""
        return [
            {"epoch": epoch, **{k: None if math.isnan(v) else v for k, v in sorted(row.items())}}
            for epoch, row in sorted(self.epochs.items())
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_times": self.epoch_times, "history": self.history, "epochs": self.epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_times = list(state_dict["epoch_times"])
        self.history = [tuple(x) for x in state_dict["history"]]
        # Checkpoints written before the per-epoch rows existed resume with the curves of the new epochs.
        self.epochs = {int(k): dict(v) for k, v in state_dict.get("epochs", {}).items()}


def build(cfg: DictConfig) -> tuple[RecDataModule, L.LightningModule]:
    """The data module (prepared and set up) and the LightningModule with encoder and head injected."""
    dm: RecDataModule = instantiate(cfg.datamodule, data=cfg.data, _recursive_=False)
    dm.prepare_data()
    dm.setup()
    model = build_model(cfg, dm.encoder_inputs, dm.head_inputs)
    module = instantiate(
        cfg.module, encoder=model.encoder, head=model.head, item_counts=torch.as_tensor(dm.item_counts)
    )
    return dm, module


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    return [instantiate(c) for c in (group or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


METRICS_HINT = (
    "free disk space or choose a writable folder (paths.output_dir= for train, out_dir= for evaluate); any "
    "previous file there is unchanged"
)


def format_table(rows: dict[str, float], baseline: dict[str, float]) -> str:
    names = [b for b in ("popularity", "bias") if any(k.startswith(f"baseline_{b}_") for k in baseline)]
    header = f"{'metric':<18}{'model':>10}" + "".join(f"{n:>12}" for n in names)
    lines = [header, "-" * len(header)]
    for key, value in rows.items():
        if key.startswith(("masked_", "unmasked_")) and not key.endswith("@10"):
            continue  # the other protocol in brief; metrics.json holds every value
        cells = []
        for name in names:
            base = baseline.get(f"baseline_{name}_{key}")
            cells.append(f"{base:>12.4f}" if base is not None else f"{'':>12}")
        lines.append(f"{key:<18}{value:>10.4f}{''.join(cells)}".replace("nan", "n/a"))
    return "\n".join(lines)


def optimized_value(result: dict[str, Any], name: str) -> float:
    """The value `optimized_metric` names, for a sweeper: `val/<metric>` is that validation metric at
    the best epoch (what the kept checkpoint scored); `<metric>` or `test/<metric>` the test value
    in metrics.json. NaN when the run has none (e.g. test=false), which Optuna records as a failed trial."""
    if name.startswith("val/"):
        best = result.get("best_epoch")
        row = next((r for r in result.get("epoch_history", []) if r["epoch"] == best), {})
        value = row.get(name)
    else:
        value = result.get(name.removeprefix("test/"))
    return float("nan") if value is None else float(value)


def _choices(cfg: DictConfig) -> dict[str, str]:
    """The config group options this run composed (model=mamba, experiment=ctr, ...)."""
    from hydra.core.hydra_config import HydraConfig

    choices = OmegaConf.select(cfg, "hydra.runtime.choices", default=None)
    if choices is None and HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
    picked = {str(k): str(v) for k, v in (choices or {}).items() if not str(k).startswith("hydra")}
    # The recipe entry is optional: most <experiment>_<model> pairs have none, and naming one that
    # does not exist would tell a tracker's reader that settings were applied when none were.
    if "recipe" in picked and not (config_dir() / "recipe" / f"{picked['recipe']}.yaml").is_file():
        del picked["recipe"]
    return picked


def tracking_params(cfg: DictConfig) -> dict[str, Any]:
    """What trackers record as the run's parameters: every key of the resolved config (dotted), and
    the groups chosen as choice/<group>, so runs can be filtered by model or experiment."""
    # Key by key, without `hydra` (outside a sweep its sweep keys are missing and do not resolve).
    resolved = {
        str(key): OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        for key, node in ((k, cfg[k]) for k in cfg if k != "hydra")
    }
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = (
                node if isinstance(node, int | float | str | bool) or node is None else str(node)
            )

    walk(resolved, "")
    return flat | {f"choice/{k}": v for k, v in _choices(cfg).items()}


def allow_local_mlflow_store(cfg: DictConfig) -> None:
    """MLflow 3 refuses a `file:` tracking store (its maintenance-mode backend) unless
    MLFLOW_ALLOW_FILE_STORE is set. conf/logger/mlflow.yaml's default is such a local store on purpose
    (no server, no database), so a run whose MLflow logger names one allows it for this process."""
    for tracker in (cfg.get("logger") or {}).values():
        if not isinstance(tracker, DictConfig) or "MLFlowLogger" not in str(tracker.get("_target_", "")):
            continue
        uri = str(tracker.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI", ""))
        if uri.startswith("file:") or "://" not in uri:  # no scheme: MLflow reads a folder path too
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _model_name(cfg: DictConfig, encoder: torch.nn.Module) -> str:
    """The `model=` choice (from the composed config in tests, from Hydra in a CLI run), else the class."""
    from hydra.core.hydra_config import HydraConfig

    choice = OmegaConf.select(cfg, "hydra.runtime.choices.model", default=None)
    if choice is None and HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("model")
    return str(choice) if choice else type(encoder).__name__


def train(cfg: DictConfig, extra_callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Fit and test as `cfg` says; returns (and writes to <output_dir>/metrics.json) the run's metrics."""
    validate_config(cfg)
    logs.adopt_library_loggers()  # Lightning, imported by now, prints through the run's handlers only
    L.seed_everything(cfg.seed, workers=True)
    out_dir = checks.output_dir(cfg.paths.output_dir, "paths.output_dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RecsysError(
            f"paths.output_dir={out_dir} cannot be created ({err}); choose another path"
        ) from err
    dm, module = build(cfg)
    # Before training, also to fail early on a bad logger/callback/trainer config.
    callbacks: list[Callback] = _instantiate_all(cfg.get("callbacks"))
    if cfg.get("ckpt_path"):
        # Keep checkpointing into the interrupted run's folder: Lightning restores the best-so-far
        # score only when dirpath is unchanged, and "best" must span the whole run.
        for cb in callbacks:
            if isinstance(cb, ModelCheckpoint):
                cb.dirpath = str(Path(cfg.ckpt_path).resolve().parent)
    allow_local_mlflow_store(cfg)
    loggers = _instantiate_all(cfg.get("logger"))
    if not loggers:  # LearningRateMonitor refuses to run without a logger
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    stats = RunStats(cfg.task.monitor, cfg.task.mode)
    callbacks.append(stats)
    callbacks += extra_callbacks or []
    for tracker in loggers:
        tracker.log_hyperparams(tracking_params(cfg))
    # The checkpoint IO writes atomically, stamps this run's metadata and loads only matching checkpoints.
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[run_checkpoint_io(cfg, dm.prepared, module.encoder, module.head)],
    )
    if trainer.is_global_zero:
        composed = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(composed))

    start = time.perf_counter()
    if cfg.get("train", True):
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    train_time = time.perf_counter() - start
    # Snapshot now: testing the best checkpoint restores callback states from that earlier epoch.
    epoch_times, best_epoch, epoch_rows = list(stats.epoch_times), stats.best_epoch, stats.epoch_rows()
    early = next((cb for cb in callbacks if isinstance(cb, EarlyStopping)), None)
    stopped_early = bool(early is not None and early.stopped_epoch > 0)

    # Before testing: the loggers are finalised (closed) when the test ends.
    baseline = dm.task.baselines(dm.prepared, dm.datasets, module)
    for tracker in trainer.loggers:
        tracker.log_metrics({f"baseline/{k.removeprefix('baseline_')}": v for k, v in baseline.items()})
    test_metrics: dict[str, float] = {}
    if cfg.get("test", True):
        # The best-epoch checkpoint (the one with a monitor), not last_checkpoint's latest epoch
        checkpoints = [cb for cb in callbacks if isinstance(cb, ModelCheckpoint)]
        checkpoint = next((cb for cb in checkpoints if cb.monitor), checkpoints[0] if checkpoints else None)
        if cfg.get("train", True):
            weights = checkpoint.best_model_path if checkpoint is not None else None
        else:
            weights = cfg.get("ckpt_path")  # test only: the given checkpoint, else the fresh weights
        # verbose=False: the table below shows these metrics beside the baselines, in the run's log too
        trainer.test(module, datamodule=dm, ckpt_path=weights or None, weights_only=True, verbose=False)
        test_metrics = dict(module.last_metrics.get("test", {}))

    model_name = _model_name(cfg, module.encoder)
    result: dict[str, Any] = {
        **test_metrics,
        **baseline,
        "task": cfg.task.name,
        "model": model_name,
        "name": str(cfg.get("name") or model_name),
        "data": str(OmegaConf.select(cfg, "data.name", default="")),
        "seed": int(cfg.seed),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "n_params": int(sum(p.numel() for p in module.parameters())),
        "epochs": len(epoch_times),
        "train_time_s": round(train_time, 3),
        "epoch_time_s": round(sum(epoch_times) / max(len(epoch_times), 1), 3),
        "best_epoch": best_epoch,
        "stopped_early": stopped_early,
        "precision": str(cfg.trainer.get("precision", "32")),
        "world_size": trainer.world_size,
        "epoch_history": epoch_rows,
    }
    # NaN (e.g. GAUC when every test user has one class) is not JSON: written as null.
    result = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in result.items()}
    metric = str(cfg.get("optimized_metric") or cfg.task.monitor)
    value = optimized_value(result, metric)
    result |= {"optimized_metric": metric, "optimized_value": None if math.isnan(value) else value}
    if trainer.is_global_zero:
        write_json_atomic(out_dir / "metrics.json", result, hint=METRICS_HINT)
        log.info(
            "Test metrics (%s, %s, %s epochs, %.1f s):\n%s\n%s = %s\nmetrics: %s",
            result["name"],
            cfg.task.name,
            result["epochs"],
            train_time,
            format_table(test_metrics, baseline),
            metric,
            "n/a" if math.isnan(value) else f"{value:.4f}",
            out_dir / "metrics.json",
        )
    return result
