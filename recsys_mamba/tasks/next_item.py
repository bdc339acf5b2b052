"""Next-click: every position of a user's training events predicts the next event; at evaluation the
first valid (test) event is ranked among all items, with the user's history in the ranking
(`unmasked_*`) and out of it (`masked_*`), the two protocols published numbers use."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from recsys_mamba.metrics import ranking_metrics, target_ranks
from recsys_mamba.models.score_terms import History
from recsys_mamba.models.transitions import TransitionTable
from recsys_mamba.sequences.datasets import BatchDataset, NextItemEvalDataset, NextItemTrainDataset
from recsys_mamba.sequences.padding import gather_last
from recsys_mamba.sequences.prepared import PreparedData
from recsys_mamba.tasks.base import Batch, DataSettings, HeadInputs, Model, Task

# Recommendations kept per evaluated history (catalogue coverage and popularity bias in reports).
EVAL_TOP_K = 20
# Next-click ranking protocols, both reported: history items competing (unmasked) or given -inf (masked).
PROTOCOLS = ("unmasked", "masked")
REPORT_KS: tuple[int, ...] = (1, 5, 10, 20)
BASELINE_METRICS = ("hr@10", "ndcg@10", "mrr@10")
BASELINE_CHUNK = 512  # test rows ranked at once by the popularity baseline
# Positions per batch in the contrastive term: its cost is quadratic in them, and a thousand
# in-batch negatives are already many (DuoRec uses a batch of 256).
CONTRASTIVE_POSITIONS = 1024


def history_without_target(items: Tensor, target: Tensor) -> Tensor:
    """The history with the target's own id blanked, so masking seen items never hides the answer."""
    return items.masked_fill(items == target.unsqueeze(1), 0)


def trained_lengths(data: PreparedData, settings: DataSettings) -> np.ndarray:
    """Each user's events the model trains on: those before the validation event, or with
    `train_on_valid` (the protocol that retrains on the validation targets before the test) those
    before the test event."""
    store = data.store
    return store.lengths_before_test() if settings.train_on_valid else store.training_lengths()


def maskable_history(batch: Batch) -> Tensor:
    """The items the masked protocol removes: the user's whole history before the target (the
    batch's "history"; its encoded "items" when it has none), the target's own id blanked."""
    return history_without_target(batch.get("history", batch["items"]), batch["target"])


def ranking_history(batch: Batch) -> History:
    """What each ranked user has seen: the whole history before the target when the batch carries it
    (evaluation batches do), not only the encoded window of `max_len` events."""
    if "history" not in batch:
        return History.last(batch["items"], batch["lengths"])
    return History.last(batch["history"])


class NextItemTask(Task):
    name = "next_item"
    metric_names = ("hr@1", "hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr@10")
    headline_metrics = BASELINE_METRICS
    monitor = "val/ndcg@10"
    baseline_names = ("popularity",)
    baseline_descriptions = {"popularity": "every item ranked by its training count"}  # noqa: RUF012
    selection_metric = "unmasked_ndcg@10"
    compared_metrics = ("unmasked_ndcg@10", "masked_ndcg@10")

    # ---- data ----------------------------------------------------------------------------------

    def datasets(self, data: PreparedData, settings: DataSettings) -> dict[str, BatchDataset]:
        store = data.store
        first = store.split_positions()
        n_train = trained_lengths(data, settings)
        return {
            "train": NextItemTrainDataset(
                store, settings.max_len, n_train, settings.positive_targets, settings.next_item_windows
            ),
            "valid": NextItemEvalDataset(store, settings.max_len, first[:, 1]),
            "test": NextItemEvalDataset(store, settings.max_len, first[:, 2]),
        }

    def head_inputs(self, data: PreparedData, datasets: dict[str, BatchDataset]) -> HeadInputs:
        train = datasets["train"]
        assert isinstance(train, NextItemTrainDataset)

        def transitions() -> TransitionTable:
            """Counts of every pair of consecutive events the model trains on."""
            pairs = data.store.consecutive_pairs(train.n_train)
            return TransitionTable(int(data.manifest["n_items"]), *pairs)

        return HeadInputs(transitions=transitions)

    def samples(self, batch: Batch) -> int:
        return len(batch["index"])

    # ---- training ------------------------------------------------------------------------------

    def loss(self, model: Model, batch: Batch, item_log_probs: Tensor | None = None) -> Tensor:
        hidden = model.encoder.encode(batch)
        targets = batch["targets"]
        real = targets > 0
        history = History.causal(batch["items"], real, targets) if model.head.uses_history else None
        loss = model.head.loss(model.encoder, hidden[real], targets[real], history, item_log_probs)
        if getattr(model.head, "future_steps", 0) and model.training:
            loss = loss + model.head.future_loss(model.encoder, hidden, targets, item_log_probs)
        weight = getattr(model.head, "contrastive_weight", 0.0)
        if weight and model.training:
            # A second encoding of the same rows draws other dropout masks: the two views to contrast.
            second = model.encoder.encode(batch)[real]
            picked = torch.randperm(second.shape[0], device=second.device)[:CONTRASTIVE_POSITIONS]
            first, picked_targets = hidden[real][picked], targets[real][picked]
            loss = loss + weight * model.head.contrastive_loss(first, second[picked], picked_targets)
        return loss

    def loss_targets(self, batch: Batch) -> int:
        return int((batch["targets"] > 0).sum())

    def train_logs(self, model: Model) -> dict[str, Tensor]:
        head = model.head
        learned = {
            "seen_bias": head.seen_bias,
            "transition_weight": head.transition_weight,
            "attribute_weight": getattr(head, "attribute_weight", None),
        }
        logs = {name: value.detach() for name, value in learned.items() if value is not None}
        earlier = getattr(head, "earlier_transition_weights", None)
        for i, weight in enumerate(() if earlier is None else earlier.detach()):
            logs[f"transition_weight_lag{i + 2}"] = weight
        return logs

    # ---- evaluation ----------------------------------------------------------------------------

    def protocol_scores(self, model: Model, batch: Batch) -> tuple[Tensor, Tensor]:
        """Scores of every item (B, n_items + 1) after each evaluation row's history: with the
        history in the ranking (unmasked) and out of it (masked: the whole history, the target's own
        id excepted)."""
        # encode_last: under no_grad Mamba encodes only the real events and runs its last block at the
        # last one alone (the same state to float rounding, less work; BENCHMARKS.md)
        hidden = model.encoder.encode_last(batch)
        history = ranking_history(batch) if model.head.uses_history else None
        unmasked = model.head.rank_scores(model.encoder, hidden, history).float()
        return unmasked, unmasked.scatter(1, maskable_history(batch), float("-inf"))

    def rank_scores(self, model: Model, batch: Batch) -> Tensor:
        """The scores of the protocol the head was trained for (`head.mask_history`)."""
        unmasked, masked = self.protocol_scores(model, batch)
        return masked if model.head.mask_history else unmasked

    def eval_outputs(self, model: Model, batch: Batch) -> dict[str, Tensor]:
        # Published numbers use either protocol, so both are ranked; the head's mask_history picks the
        # primary one (monitored, plain metric names, top-K), the other is reported beside it.
        unmasked, masked = self.protocol_scores(model, batch)
        scores = masked if model.head.mask_history else unmasked
        # Column 0 is padding, never a recommendation.
        top = scores[:, 1:].topk(min(EVAL_TOP_K, scores.shape[1] - 1), dim=1).indices + 1
        return {
            "ranks": target_ranks(scores, batch["target"]),
            "ranks_unmasked": target_ranks(unmasked, batch["target"]),
            "ranks_masked": target_ranks(masked, batch["target"]),
            "topk": top,
            "index": batch["index"],
        }

    def metrics(self, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        metrics = ranking_metrics(arrays["ranks"])
        for protocol in PROTOCOLS:
            extra = ranking_metrics(arrays[f"ranks_{protocol}"])
            metrics.update({f"{protocol}_{k}": v for k, v in extra.items()})
        return metrics

    def baselines(
        self, data: PreparedData, datasets: dict[str, BatchDataset], model: Model
    ) -> dict[str, float]:
        """Every item ranked by its training count, under the protocol of the model's head."""
        counts = torch.as_tensor(data.items.counts, dtype=torch.float64)
        counts[0] = float("-inf")
        test = datasets["test"]
        ranks = []
        for start in range(0, len(test), BASELINE_CHUNK):
            batch = test.__getitems__(list(range(start, min(start + BASELINE_CHUNK, len(test)))))
            scores = counts.expand(len(batch["target"]), -1).clone()
            if model.head.mask_history:
                scores.scatter_(1, maskable_history(batch), float("-inf"))
            ranks.append(target_ranks(scores, batch["target"]))
        metrics = ranking_metrics(torch.cat(ranks))
        return {f"baseline_popularity_{k}": metrics[k] for k in BASELINE_METRICS}

    # ---- reports -------------------------------------------------------------------------------

    def sample_details(self, dataset: BatchDataset, index: np.ndarray) -> dict[str, np.ndarray]:
        assert isinstance(dataset, NextItemEvalDataset)
        store = dataset.store
        targets = store.values("items", store.start[dataset.rows] + dataset.target_pos)
        return {"target": targets[index], "users": store.users[dataset.rows][index]}

    def report_metrics(self, arrays: dict[str, np.ndarray], n_bins: int) -> Callable[[np.ndarray], dict]:
        def metrics(idx: np.ndarray) -> dict[str, float]:
            ranks = arrays["ranks"][idx]
            out = ranking_metrics(ranks, hr_ks=REPORT_KS, ndcg_ks=REPORT_KS, mrr_k=REPORT_KS[-1])
            for k in REPORT_KS[:-1]:
                out.update(ranking_metrics(ranks, hr_ks=(), ndcg_ks=(), mrr_k=k))
            return out

        return metrics

    def report_extras(self, arrays: dict[str, np.ndarray], item_counts: np.ndarray) -> dict[str, float]:
        """Catalogue coverage and popularity bias (mean training count of recommended vs clicked items)."""
        topk = arrays["topk"]
        n_items = len(item_counts) - 1
        target_pop = float(np.mean(item_counts[arrays["target"]])) or 1.0
        out: dict[str, float] = {}
        for k in REPORT_KS:
            top = topk[:, :k]
            out[f"coverage@{k}"] = float(np.unique(top).size / max(n_items, 1))
            out[f"pop_bias@{k}"] = float(np.mean(item_counts[top]) / target_pop)
        return out

    def report_plots(
        self, models: list[tuple[str, dict[str, np.ndarray]]], metrics: list[dict[str, float]], n_bins: int
    ) -> dict[str, str]:
        from recsys_mamba.figures import new_figure, png

        fig, ax = new_figure()
        for (name, _), values in zip(models, metrics, strict=True):
            ax.plot(REPORT_KS, [values[f"hr@{k}"] for k in REPORT_KS], marker="o", label=f"{name} HR")
            ax.plot(
                REPORT_KS, [values[f"ndcg@{k}"] for k in REPORT_KS], marker="s", ls="--", label=f"{name} NDCG"
            )
        ax.set(title="HR and NDCG by K", xlabel="K", ylabel="value", xticks=list(REPORT_KS))
        ax.legend(fontsize=8)
        return {"HR and NDCG by K": png(fig)}

    def table_columns(self, mask_history: bool) -> list[str]:
        return [f"{p}_{m}" for p in PROTOCOLS for m in self.headline_metrics]

    def baseline_rows(self, metrics: dict[str, Any], mask_history: bool) -> list[tuple[str, list[str]]]:
        # The popularity baseline is ranked under the protocol of the run's head.
        protocol = "masked" if mask_history else "unmasked"
        cells = [
            metrics.get(f"baseline_popularity_{c.removeprefix(protocol + '_')}")
            if c.startswith(protocol)
            else None
            for c in self.table_columns(mask_history)
        ]
        return [("popularity", cells)]

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
        """The dot-product score of the model's ranking (plus the head's terms) for each pair."""
        last = gather_last(hidden, lengths)[rows]
        picked = None if history is None else history.subset(rows)
        return model.head.candidate_scores(model.encoder, last, items[:, None], picked)[:, 0]
