"""Score a checkpoint's test split through the task's one inference path (`Task.evaluate`, which the
training module's test step uses as well), on the batches the run's test loader would make."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from recsys_mamba.errors import RecsysError
from recsys_mamba.runs import load_run, run_folder
from recsys_mamba.tasks import Task


@dataclass
class Scored:
    """One model's test outputs, aligned by test-sample index."""

    name: str
    ckpt_path: Path
    task: Task
    config: DictConfig
    manifest: dict[str, Any]
    metrics: dict[str, float]  # exactly what the training run's test computed
    arrays: dict[str, np.ndarray]  # index, users, the task's outputs and its per-sample details
    item_counts: np.ndarray
    training_metrics: dict[str, Any] | None = None
    run_folder: Path | None = None  # the train run's folder (the checkpoint's)
    baselines: dict[str, float] = field(default_factory=dict)  # baseline_<name>_<metric>, same test samples


def _model_name(cfg: DictConfig, training: dict[str, Any] | None) -> str:
    """The run's `name=` (metrics.json), else its model choice, else the encoder's class."""
    for key in ("name", "model"):
        if training and training.get(key):
            return str(training[key])
    return str(OmegaConf.select(cfg, "model._target_", default="model")).rsplit(".", 1)[-1]


def _baselines(run: Any, training: dict[str, Any] | None) -> dict[str, float]:
    """The run's baselines as its metrics.json recorded them (computed on these same test samples),
    else computed now (a run folder without metrics.json, e.g. a killed run's last.ckpt)."""
    recorded = {k: v for k, v in (training or {}).items() if k.startswith("baseline_")}
    if recorded:
        return recorded
    datasets = run.task.datasets(run.data, run.data_settings())
    return run.task.baselines(run.data, datasets, run.model)


def test_batches(dataset: Any, batch_size: int, limit: int | float | None = None) -> Any:
    """The run's test batches: consecutive rows, `batch_size` at a time, as many as its trainer's
    limit_test_batches let its test see (a count, or a fraction of the batches)."""
    starts = range(0, len(dataset), batch_size)
    if isinstance(limit, float):
        starts = starts[: int(len(starts) * limit)]
    elif isinstance(limit, int):
        starts = starts[:limit]
    for start in starts:
        yield dataset.__getitems__(list(range(start, min(start + batch_size, len(dataset)))))


def score(ckpt_path: Path, prepared: Path | None = None) -> Scored:
    """The checkpoint's (or bundle's) test metrics and per-sample outputs, as its training run's test
    computed them; `prepared`: the data to test on (null: the run's own prepared folder)."""
    run = load_run(ckpt_path, prepared)
    data = run.prepared_data()
    test = run.task.datasets(data, run.data_settings())["test"]
    batch_size = int(OmegaConf.select(run.config, "datamodule.eval_batch_size", default=512))
    limit = OmegaConf.select(run.config, "trainer.limit_test_batches", default=None)
    outputs = run.task.evaluate(run.model, test_batches(test, batch_size, limit))
    if not outputs.arrays:
        raise RecsysError(f"the test split of {ckpt_path} produced no samples; nothing to evaluate")
    arrays = {**outputs.arrays, **run.task.sample_details(test, outputs.arrays["index"])}
    folder = run_folder(ckpt_path)
    metrics_file = folder / "metrics.json"
    training = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    return Scored(
        name=_model_name(run.config, training),
        ckpt_path=ckpt_path,
        task=run.task,
        config=run.config,
        manifest=data.manifest,
        metrics=outputs.metrics,
        arrays=arrays,
        item_counts=data.items.counts,
        training_metrics=training,
        run_folder=folder,
        baselines=_baselines(run, training),
    )
