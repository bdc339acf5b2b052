"""The contract of a task: everything that differs between predicting the next click and the click
probability of a shown item, so no other module branches on which task it runs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from recsys_mamba.models.base import SequenceEncoder
from recsys_mamba.models.score_terms import History
from recsys_mamba.models.transitions import TransitionTable
from recsys_mamba.schema import Int
from recsys_mamba.sequences.datasets import BatchDataset
from recsys_mamba.sequences.prepared import PreparedData

Batch = dict[str, Tensor]
MAX_LEN = Int(1, 1 << 24, example=50)  # the rule of every config's max_len


class Model(Protocol):
    """An encoder and its task head (`models.RecModel`, or the LightningModule that trains one)."""

    encoder: SequenceEncoder
    head: nn.Module


@dataclass(frozen=True)
class DataSettings:
    """How a task cuts the prepared sequences into samples (the `datamodule.*` keys)."""

    max_len: int = 50  # most recent events kept per history
    positive_targets: bool = True  # next_item: events labelled 0 are history, never targets
    next_item_windows: bool = True  # next_item: overlapping rows train every target of long users
    ctr_train_windows: bool = True  # ctr: a user's samples share one encoded window in training
    train_on_valid: bool = False  # next_item: the validation events are training targets too

    def __post_init__(self) -> None:
        MAX_LEN.check(self.max_len, "max_len")


@dataclass(frozen=True)
class HeadInputs:
    """What the training data gives a head beside the encoder (computed only when the head asks)."""

    base_rate: Callable[[], float] | None = None  # ctr: the training click rate, to start the output bias
    transitions: Callable[[], TransitionTable] | None = None  # next_item: training transition counts
    n_users: Callable[[], int] | None = None  # the users a head with user embeddings gives a vector


@dataclass(frozen=True)
class Outputs:
    """One split's per-sample outputs (index-aligned numpy arrays) and its metrics."""

    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]


def unique_by_index(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each sample once, in index order (several processes' outputs repeat the samples that padded
    their shares to equal size)."""
    if not arrays:
        return arrays
    _, first = np.unique(arrays["index"], return_index=True)
    return {key: value[first] for key, value in arrays.items()}


class Task(ABC):
    name: str
    metric_names: tuple[str, ...]  # the test metrics every metrics.json holds
    headline_metrics: tuple[str, ...]  # the few every table of runs shows
    monitor: str  # the validation metric checkpointing and early stopping follow by default
    baseline_names: tuple[str, ...]  # the baselines metrics.json reports beside the model
    baseline_descriptions: dict[str, str] = {}  # noqa: RUF012  (name -> what it is, for reports; read-only)
    selection_metric: str  # higher is better: picks a model's best group in a table of runs
    compared_metrics: tuple[str, ...]  # where a table of runs checks mamba >= sasrec
    beats_baselines_on: tuple[str, ...] = ()  # where a table of runs checks model > each baseline

    # ---- data ----------------------------------------------------------------------------------

    @abstractmethod
    def datasets(self, data: PreparedData, settings: DataSettings) -> dict[str, BatchDataset]:
        """The train, valid and test datasets of this task on `data`."""

    @abstractmethod
    def head_inputs(self, data: PreparedData, datasets: dict[str, BatchDataset]) -> HeadInputs: ...

    @abstractmethod
    def samples(self, batch: Batch) -> int:
        """How many samples `batch` holds (what a per-sample average is over)."""

    # ---- training ------------------------------------------------------------------------------

    @abstractmethod
    def loss(self, model: Model, batch: Batch, item_log_probs: Tensor | None = None) -> Tensor: ...

    def loss_targets(self, batch: Batch) -> int:
        """How many targets the batch's mean loss averages over."""
        return self.samples(batch)

    def train_logs(self, model: Model) -> dict[str, Tensor]:
        """Learned scalars worth following during training (e.g. a head's learned bias)."""
        return {}

    # ---- evaluation ----------------------------------------------------------------------------

    @abstractmethod
    def eval_outputs(self, model: Model, batch: Batch) -> dict[str, Tensor]:
        """Per-sample outputs of an evaluation batch; "index" (the sample's row in the dataset) too."""

    @abstractmethod
    def metrics(self, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        """The split's metrics from the outputs of every batch, concatenated."""

    @torch.no_grad()
    def evaluate(self, model: Model, batches: Any) -> Outputs:
        """Outputs and metrics over `batches` (an iterable, e.g. a DataLoader): the one inference path
        of validation, testing and the evaluation report."""
        parts: dict[str, list[Tensor]] = {}
        for batch in batches:
            for key, value in self.eval_outputs(model, batch).items():
                parts.setdefault(key, []).append(value.detach())
        arrays = unique_by_index({key: torch.cat(values).cpu().numpy() for key, values in parts.items()})
        return Outputs(arrays, self.metrics(arrays) if arrays else {})

    @abstractmethod
    def baselines(
        self, data: PreparedData, datasets: dict[str, BatchDataset], model: Model
    ) -> dict[str, float]:
        """Non-sequential baselines on exactly the test samples, as `baseline_<name>_<metric>` keys."""

    # ---- reports -------------------------------------------------------------------------------

    @abstractmethod
    def sample_details(self, dataset: BatchDataset, index: np.ndarray) -> dict[str, np.ndarray]:
        """Per test sample: "users" and what the report breaks metrics down by."""

    @abstractmethod
    def report_metrics(self, arrays: dict[str, np.ndarray], n_bins: int) -> Callable[[np.ndarray], dict]:
        """The report's metrics on a subset of samples (given as indices): what the bootstrap resamples."""

    def report_extras(self, arrays: dict[str, np.ndarray], item_counts: np.ndarray) -> dict[str, float]:
        """Metrics of the whole split that the bootstrap does not resample."""
        return {}

    def report_tables(
        self, arrays: dict[str, np.ndarray], item_counts: np.ndarray, n_bins: int
    ) -> dict[str, list[dict[str, Any]]]:
        """Named tables of one model's metrics by some breakdown (rows of dicts)."""
        return {}

    @abstractmethod
    def report_plots(
        self, models: list[tuple[str, dict[str, np.ndarray]]], metrics: list[dict[str, float]], n_bins: int
    ) -> dict[str, str]:
        """caption -> base64 PNG over every compared model (name, arrays)."""

    def table_columns(self, mask_history: bool) -> list[str]:
        """The metric columns a table of finished runs shows."""
        return list(self.headline_metrics)

    def summary_metrics(self) -> list[str]:
        """Every metric a table of finished runs summarises over seeds."""
        names = [*self.headline_metrics, *self.table_columns(False), *self.table_columns(True)]
        names += [f"baseline_{b}_{m}" for b in self.baseline_names for m in self.headline_metrics]
        return list(dict.fromkeys(names))

    def report_baselines(self, baselines: dict[str, Any]) -> dict[str, dict[str, float]]:
        """The report's baseline columns: "<name>: <what it is>" -> {test metric: value}, from the
        `baseline_<name>_<metric>` keys of a run's metrics.json (metrics a baseline has no value for,
        such as a ranking's LogLoss, are left out)."""
        out = {}
        for name in self.baseline_names:
            values = {
                m: baselines[f"baseline_{name}_{m}"]
                for m in self.metric_names
                if f"baseline_{name}_{m}" in baselines
            }
            if values:
                out[f"{name}: {self.baseline_descriptions.get(name, name)}"] = values
        return out

    @abstractmethod
    def baseline_rows(self, metrics: dict[str, Any], mask_history: bool) -> list[tuple[str, list[str]]]:
        """Rows (name, one cell per `table_columns`) of the baselines beside a table of runs."""

    # ---- scoring -------------------------------------------------------------------------------

    @abstractmethod
    def score_pairs(
        self,
        model: Model,
        hidden: Tensor,
        lengths: Tensor,
        history: History | None,
        rows: Tensor,
        items: Tensor,
        categories: Tensor,
        users: Tensor | None = None,
    ) -> Tensor:
        """Scores of (user, item) pairs: row `rows[i]` of the encoded histories `hidden` (B, L, d) with
        `lengths` (B,), against `items[i]` (and its category); `history` (B rows): what each user has
        had, for a head whose scores depend on it (`head.uses_history`); `users`: each pair's
        user_idx (0 = unknown), for a head with user embeddings (`head.n_users` > 0)."""
