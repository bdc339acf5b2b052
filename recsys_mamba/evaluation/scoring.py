"""Score a checkpoint's test split through the task's one inference path (`Task.evaluate`, which the
training module's test step uses as well), on the batches the run's test loader would make."""

from __future__ import annotations

import json
from dataclasses import dataclass
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


def _model_name(cfg: DictConfig, training: dict[str, Any] | None) -> str:
    if training and training.get("model"):
        return str(training["model"])
    return str(OmegaConf.select(cfg, "model._target_", default="model")).rsplit(".", 1)[-1]


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
    metrics_file = run_folder(ckpt_path) / "metrics.json"
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
    )
