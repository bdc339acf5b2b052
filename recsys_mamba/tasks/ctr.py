"""Click-through rate: each sample is an item shown to a user after their history so far, labelled
clicked or not; the model's sigmoid(logit) estimates the click probability (AUC, GAUC, LogLoss)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl
import torch
from scipy.sparse import csr_matrix, hstack
from torch import Tensor

from recsys_mamba.metrics import auc, ctr_metrics, expected_calibration_error, gauc, logloss, reliability_bins
from recsys_mamba.metrics import sigmoid as np_sigmoid
from recsys_mamba.models.score_terms import History
from recsys_mamba.sequences.datasets import BatchDataset, CTRDataset, CTRWindowDataset
from recsys_mamba.sequences.prepared import PreparedData
from recsys_mamba.sequences.store import SPLITS
from recsys_mamba.tasks.base import Batch, DataSettings, HeadInputs, Model, Task

METRICS = ("auc", "gauc", "logloss")
HIST_EDGES: tuple[int, ...] = (0, 5, 10, 20, 50)  # history-length buckets of the report
PRIOR_IMPRESSIONS = 10.0  # the popularity baseline's Beta prior: worth 10 impressions at the global rate


def ctr_logits(model: Model, batch: Batch) -> Tensor:
    """The head's click logit of every sample of `batch`."""
    hidden = model.encoder.encode(batch)
    lengths = batch["lengths"]
    if "sample_window" in batch:  # several samples share one encoded window (CTRWindowDataset)
        # index_select, not hidden[...]: its backward (index_add_) sums repeated rows in a fixed order,
        # where advanced indexing's accumulates them in whatever order two threads happen to take.
        hidden = hidden.index_select(0, batch["sample_window"])
        lengths = batch["sample_hist"]
    mask = real_positions(hidden.shape[1], lengths)
    return model.head(
        model.encoder, hidden, mask, batch["cand_items"], batch.get("cand_categories"), batch["users"]
    )


def real_positions(width: int, lengths: Tensor) -> Tensor:
    """(B, width) True at each row's first `lengths` positions."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def train_samples(datasets: dict[str, BatchDataset]) -> CTRDataset:
    train = datasets["train"]
    return train.samples if isinstance(train, CTRWindowDataset) else train  # type: ignore[return-value]


class CTRTask(Task):
    name = "ctr"
    metric_names = METRICS
    headline_metrics = METRICS
    monitor = "val/auc"
    baseline_names = ("popularity", "bias")
    baseline_descriptions = {  # noqa: RUF012
        "popularity": "the item's smoothed training click rate",
        "bias": "logistic regression on one-hot user and item",
    }
    selection_metric = "auc"
    compared_metrics = ("auc",)
    beats_baselines_on = ("auc",)

    # ---- data ----------------------------------------------------------------------------------

    def datasets(self, data: PreparedData, settings: DataSettings) -> dict[str, BatchDataset]:
        samples = data.ctr_samples()
        store = data.store
        datasets: dict[str, BatchDataset] = {
            name: CTRDataset(store, settings.max_len, samples.filter(pl.col("split") == code))
            for name, code in SPLITS.items()
        }
        if settings.ctr_train_windows:
            datasets["train"] = CTRWindowDataset(datasets["train"])  # type: ignore[arg-type]
        return datasets

    def head_inputs(self, data: PreparedData, datasets: dict[str, BatchDataset]) -> HeadInputs:
        frame = train_samples(datasets).frame
        return HeadInputs(
            base_rate=lambda: float(frame["label"].cast(float).mean()),
            n_users=lambda: int(data.manifest["n_users"]),
        )

    def samples(self, batch: Batch) -> int:
        return len(batch["labels"])

    # ---- training ------------------------------------------------------------------------------

    def loss(self, model: Model, batch: Batch, item_log_probs: Tensor | None = None) -> Tensor:
        return model.head.loss(ctr_logits(model, batch).float(), batch["labels"].float())

    # ---- evaluation ----------------------------------------------------------------------------

    def eval_outputs(self, model: Model, batch: Batch) -> dict[str, Tensor]:
        return {
            "logits": ctr_logits(model, batch).float(),
            "labels": batch["labels"],
            "users": batch["users"],
            "index": batch["index"],
        }

    def metrics(self, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        return ctr_metrics(arrays["users"], arrays["labels"], arrays["logits"])

    def baselines(
        self, data: PreparedData, datasets: dict[str, BatchDataset], model: Model
    ) -> dict[str, float]:
        """Item popularity (a sample scored by its item's smoothed training click rate, and for
        reference by its training count) and a user + item bias model (logistic regression)."""
        train = train_samples(datasets).frame
        test: CTRDataset = datasets["test"]  # type: ignore[assignment]
        counts = data.items.counts
        out = {f"baseline_popularity_{k}": v for k, v in _popularity(train, test, counts).items()}
        out.update({f"baseline_bias_{k}": v for k, v in _bias(train, test, len(counts)).items()})
        return out

    # ---- reports -------------------------------------------------------------------------------

    def sample_details(self, dataset: BatchDataset, index: np.ndarray) -> dict[str, np.ndarray]:
        assert isinstance(dataset, CTRDataset)
        return {"hist_len": dataset.hist_len[index], "item": dataset.items[index]}

    def report_metrics(self, arrays: dict[str, np.ndarray], n_bins: int) -> Callable[[np.ndarray], dict]:
        return lambda idx: _all_metrics(arrays, idx, n_bins)

    def report_tables(
        self, arrays: dict[str, np.ndarray], item_counts: np.ndarray, n_bins: int
    ) -> dict[str, list[dict[str, Any]]]:
        """CTR metrics by history length (fixed edges) and by candidate-item popularity (quartiles)."""
        edges = np.array(HIST_EDGES)
        hist_labels = [f"{lo}-{hi - 1}" for lo, hi in itertools.pairwise(HIST_EDGES)]
        hist_labels.append(f"{HIST_EDGES[-1]}+")
        by_hist = _bucket_rows(
            arrays, hist_labels, np.searchsorted(edges, arrays["hist_len"], "right") - 1, n_bins
        )
        pop = item_counts[arrays["item"]]
        cuts = np.unique(np.quantile(pop, [0.25, 0.5, 0.75]))
        pop_edges = [pop.min(), *cuts, pop.max()]
        pop_labels = [f"{int(lo)}-{int(hi)}" for lo, hi in itertools.pairwise(pop_edges)]
        by_pop = _bucket_rows(arrays, pop_labels, np.searchsorted(cuts, pop, side="left"), n_bins)
        return {"history_length": by_hist, "item_popularity": by_pop}

    def report_plots(
        self, models: list[tuple[str, dict[str, np.ndarray]]], metrics: list[dict[str, float]], n_bins: int
    ) -> dict[str, str]:
        from sklearn.metrics import precision_recall_curve, roc_curve

        from recsys_mamba.figures import new_figure, png

        figs = {}
        for title in ("ROC curve", "Precision-recall curve", "Reliability diagram"):
            fig, ax = new_figure()
            for name, arrays in models:
                y, s = arrays["labels"], arrays["logits"]
                if title == "ROC curve" and y.min() != y.max():
                    fpr, tpr, _ = roc_curve(y, s)
                    ax.plot(fpr, tpr, label=name)
                elif title == "Precision-recall curve" and y.max() > 0:
                    precision, recall, _ = precision_recall_curve(y, s)
                    ax.plot(recall, precision, label=name)
                elif title == "Reliability diagram":
                    bins = reliability_bins(y, np_sigmoid(s), n_bins)
                    used = bins["count"] > 0
                    ax.plot(bins["mean_prob"][used], bins["rate"][used], marker="o", label=name)
            if title != "Precision-recall curve":
                ax.plot([0, 1], [0, 1], ls=":", color="grey")
            xlabel, ylabel = {
                "ROC curve": ("false positive rate", "true positive rate"),
                "Precision-recall curve": ("recall", "precision"),
                "Reliability diagram": ("mean predicted probability", "observed click rate"),
            }[title]
            ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
            ax.legend(fontsize=8)
            figs[title] = png(fig)
        return figs

    def baseline_rows(self, metrics: dict[str, Any], mask_history: bool) -> list[tuple[str, list[str]]]:
        return [
            (f"{b} baseline", [metrics.get(f"baseline_{b}_{m}") for m in METRICS])
            for b in ("popularity", "bias")
        ]

    # ---- scoring -------------------------------------------------------------------------------

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
        """The click probability of each pair."""
        mask = real_positions(hidden.shape[1], lengths)
        return model.head(model.encoder, hidden[rows], mask[rows], items, categories, users).sigmoid()


def _all_metrics(arrays: dict[str, np.ndarray], idx: np.ndarray, n_bins: int) -> dict[str, float]:
    out = ctr_metrics(arrays["users"][idx], arrays["labels"][idx], arrays["logits"][idx])
    out["ece"] = expected_calibration_error(arrays["labels"][idx], np_sigmoid(arrays["logits"][idx]), n_bins)
    return out


def _bucket_rows(
    arrays: dict[str, np.ndarray], labels: list[str], which: np.ndarray, n_bins: int
) -> list[dict]:
    rows = []
    for b, label in enumerate(labels):
        idx = np.flatnonzero(which == b)
        if idx.size:
            rows.append({"bucket": label, "n": int(idx.size), **_all_metrics(arrays, idx, n_bins)})
    return rows


def _popularity(train: pl.DataFrame, test: CTRDataset, item_counts: np.ndarray) -> dict[str, float]:
    n = len(item_counts)
    per_item = train.group_by("item_idx").agg(
        pl.len().alias("n"), pl.col("label").cast(pl.Float64).sum().alias("clicks")
    )
    prior = float(train["label"].cast(pl.Float64).mean() or 0.0)
    shows, clicks = np.zeros(n), np.zeros(n)
    shows[per_item["item_idx"].to_numpy()] = per_item["n"].to_numpy()
    clicks[per_item["item_idx"].to_numpy()] = per_item["clicks"].to_numpy()
    # A Beta prior keeps rarely shown items near the global rate.
    rate = (clicks + PRIOR_IMPRESSIONS * prior) / (shows + PRIOR_IMPRESSIONS)
    scores = rate[test.items]
    return {
        "auc": auc(test.labels, scores),
        "gauc": gauc(test.users, test.labels, scores),
        "count_auc": auc(test.labels, item_counts[test.items]),
    }


def _bias(train: pl.DataFrame, test: CTRDataset, n_items: int, l2: float = 1.0) -> dict[str, float]:
    """A logistic regression on one-hot user and item ids (a user bias plus an item bias): the strongest
    model that ignores the order of events. Users or items unseen in training get the intercept only."""
    n_users = int(test.store.row_of_user.size)

    def features(users: np.ndarray, items: np.ndarray) -> csr_matrix:
        rows = np.arange(len(users))
        ones = np.ones(len(users))
        user = csr_matrix((ones, (rows, np.minimum(users, n_users - 1))), shape=(len(users), n_users))
        item = csr_matrix((ones, (rows, items)), shape=(len(users), n_items))
        return hstack([user, item], format="csr")

    labels = train["label"].to_numpy().astype(np.int64)
    if labels.min() == labels.max():
        return {}
    # Imported here: scikit-learn takes seconds to import, and loading any model (the online service's
    # restart after a crash) imports this module.
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1.0 / l2, max_iter=500)
    model.fit(features(train["user_idx"].to_numpy(), train["item_idx"].to_numpy()), labels)
    probs = model.predict_proba(features(test.users, test.items))[:, 1]
    return {
        "auc": auc(test.labels, probs),
        "gauc": gauc(test.users, test.labels, probs),
        "logloss": logloss(test.labels, probs),
    }
