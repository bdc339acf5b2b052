"""`RecLitModule`: an injected sequence encoder + task head, trained and evaluated by Lightning."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from recsys_mamba.metrics import ctr_metrics, ranking_metrics, target_ranks
from recsys_mamba.ops.linear_ce import SeenItems

Batch = dict[str, Tensor]
# Recommendations kept per evaluated history (catalogue coverage and popularity bias in reports).
EVAL_TOP_K = 20
# Next-click ranking protocols, both reported: history items competing (unmasked) or given -inf (masked).
PROTOCOLS = ("unmasked", "masked")


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_frac: float = 0.1, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up over the first `warmup_frac` of the steps, then cosine decay to `min_lr_ratio`."""
    total = max(int(total_steps), 1)
    warmup = round(warmup_frac * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def history_without_target(items: Tensor, target: Tensor) -> Tensor:
    """The history with the target's own id blanked, so masking seen items never hides the answer."""
    return items.masked_fill(items == target.unsqueeze(1), 0)


def maskable_history(batch: Batch) -> Tensor:
    """The items the masked protocol removes: the user's whole history before the target (the
    batch's "history"; its encoded "items" when it has none), the target's own id blanked."""
    return history_without_target(batch.get("history", batch["items"]), batch["target"])


def last_items(batch: Batch) -> Tensor:
    """Each row's last real input item (B,): where a transition prior starts from."""
    rows = torch.arange(batch["items"].shape[0], device=batch["items"].device)
    return batch["items"][rows, (batch["lengths"] - 1).clamp(min=0)]


def last_hidden(hidden: Tensor, lengths: Tensor) -> Tensor:
    """Hidden state at each row's last real position, (B, d); rows with no history use position 0."""
    pos = (lengths.long() - 1).clamp(min=0)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]


class RecLitModule(L.LightningModule):
    """Trains `encoder` + `head` for `task` ("next_item" or "ctr").

    `optimizer` and `scheduler` are partials (`_partial_: true` configs): `optimizer(params)` and
    `scheduler(optimizer, total_steps=...)`. Parameters the encoder lists in `no_weight_decay()`, and
    every 1-D head parameter, are put in a group with weight decay 0.
    """

    def __init__(
        self,
        encoder: nn.Module,
        head: nn.Module,
        optimizer: Callable[..., Optimizer],
        scheduler: Callable[..., LRScheduler] | None = None,
        task: str = "next_item",
        item_counts: Tensor | np.ndarray | None = None,
        seed: int = 42,
    ) -> None:
        super().__init__()
        # The optimizer/scheduler partials stay out of the hyperparameters: pickled into checkpoints they
        # would make them unloadable with torch.load(weights_only=True).
        self.save_hyperparameters(
            logger=False, ignore=["encoder", "head", "item_counts", "optimizer", "scheduler"]
        )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.encoder = encoder
        self.head = head
        self.task = task
        counts = torch.as_tensor(item_counts if item_counts is not None else np.ones(1), dtype=torch.float32)
        probs = (counts + 1.0) / (counts + 1.0).sum()
        self.register_buffer("item_log_probs", probs.log(), persistent=False)
        self._outputs: dict[str, dict[str, list[Tensor]]] = {}
        self.last_metrics: dict[str, dict[str, float]] = {}
        # Per-sample outputs of the last validation/test epoch (index-aligned), for evaluation reports.
        self.last_outputs: dict[str, dict[str, np.ndarray]] = {}

    # ---- forward --------------------------------------------------------------------------------

    def ctr_logits(self, batch: Batch) -> Tensor:
        hidden = self.encoder.encode(batch)
        lengths = batch["lengths"]
        if "sample_window" in batch:  # several samples share one encoded window (CTRWindowDataset)
            hidden = hidden[batch["sample_window"]]
            lengths = batch["sample_hist"]
        mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
        return self.head(self.encoder, hidden, mask, batch["cand_items"], batch.get("cand_categories"))

    def _seen(
        self, items: Tensor, where: Tensor | None = None, lengths: Tensor | None = None
    ) -> SeenItems | None:
        """What each scored position's sequence holds, for a head with a seen-item bias; else None."""
        if getattr(self.head, "seen_bias", None) is None:
            return None
        n_classes = self.encoder.n_items + 1
        if where is not None:
            return SeenItems.causal(items, n_classes, where)
        return SeenItems.last(items, n_classes, lengths)

    def _ranking_seen(self, batch: Batch) -> SeenItems | None:
        """What each ranked user has seen: the whole history before the target when the batch carries
        it (evaluation batches do), not only the encoded window of `max_len` events, so a seen-item
        bias reaches items watched before the window as well."""
        if "history" not in batch:
            return self._seen(batch["items"], lengths=batch["lengths"])
        history = batch["history"]
        return self._seen(history, lengths=(history != 0).sum(1))

    def rank_scores(self, batch: Batch) -> Tensor:
        """Scores of every item (B, n_items + 1) for the next event after each history."""
        hidden = last_hidden(self.encoder.encode(batch), batch["lengths"])
        # The head masks the history only when its `mask_history` is on.
        seen = self._ranking_seen(batch)
        last = last_items(batch)
        return self.head.rank_scores(self.encoder, hidden, maskable_history(batch), seen, last)

    # ---- training -------------------------------------------------------------------------------

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        # Re-seed per batch: dropout then depends only on (seed, epoch, batch, rank), never on whatever
        # else drew random numbers before, so a run resumed from a checkpoint continues exactly like
        # the uninterrupted run.
        step = self.current_epoch * 1_000_003 + batch_idx
        torch.manual_seed((self.hparams.seed * 1_000_033 + step) * 64 + self.global_rank)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        if self.task == "ctr":
            logits = self.ctr_logits(batch)
            loss = self.head.loss(logits.float(), batch["labels"].float())
        else:
            hidden = self.encoder.encode(batch)
            targets = batch["targets"]
            real = targets > 0
            seen = self._seen(batch["items"], where=real)
            inputs = batch["items"][real]  # the item each trained position has just seen
            loss = self.head.loss(
                self.encoder, hidden[real], targets[real], self.item_log_probs, seen, inputs
            )
        n = len(batch["labels"] if self.task == "ctr" else batch["index"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        if getattr(self.head, "seen_bias", None) is not None:
            bias = self.head.seen_bias.detach()
            self.log("train/seen_bias", bias, on_step=False, on_epoch=True, batch_size=n)
        if getattr(self.head, "transition_weight", None) is not None:
            weight = self.head.transition_weight.detach()
            self.log("train/transition_weight", weight, on_step=False, on_epoch=True, batch_size=n)
        return loss

    # ---- evaluation -----------------------------------------------------------------------------

    def _eval_step(self, stage: str, batch: Batch) -> None:
        out = self._outputs.setdefault(stage, {})
        if self.task == "ctr":
            values = {
                "logits": self.ctr_logits(batch).float(),
                "labels": batch["labels"],
                "users": batch["users"],
            }
        else:
            # Published numbers use either protocol, so both are ranked; the head's mask_history picks
            # the primary one (monitored, plain metric names, top-K), the other is reported beside it.
            hidden = last_hidden(self.encoder.encode(batch), batch["lengths"])
            seen = self._ranking_seen(batch)
            unmasked = self.head.rank_scores(self.encoder, hidden, None, seen, last_items(batch)).float()
            masked = unmasked.scatter(1, maskable_history(batch), float("-inf"))
            scores = masked if getattr(self.head, "mask_history", False) else unmasked
            # Column 0 is padding, never a recommendation.
            top = scores[:, 1:].topk(min(EVAL_TOP_K, scores.shape[1] - 1), dim=1).indices + 1
            values = {
                "ranks": target_ranks(scores, batch["target"]),
                "ranks_unmasked": target_ranks(unmasked, batch["target"]),
                "ranks_masked": target_ranks(masked, batch["target"]),
                "topk": top,
            }
        values["index"] = batch["index"]
        for key, value in values.items():
            out.setdefault(key, []).append(value.detach())

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _gathered(self, stage: str) -> dict[str, np.ndarray]:
        """This epoch's outputs from every process, each sample once (DDP pads with repeats)."""
        parts = self._outputs.pop(stage, {})
        if not parts:
            return {}
        cat = {key: torch.cat(values) for key, values in parts.items()}
        if self.trainer.world_size > 1:
            cat = {key: self.all_gather(value).reshape(-1, *value.shape[1:]) for key, value in cat.items()}
        arrays = {key: value.cpu().numpy() for key, value in cat.items()}
        _, first = np.unique(arrays["index"], return_index=True)
        return {key: value[first] for key, value in arrays.items()}

    def _eval_epoch_end(self, stage: str) -> None:
        out = self._gathered(stage)
        if not out:
            return
        if self.task == "ctr":
            metrics = ctr_metrics(out["users"], out["labels"], out["logits"])
        else:
            metrics = ranking_metrics(out["ranks"])
            for protocol in PROTOCOLS:
                extra = ranking_metrics(out[f"ranks_{protocol}"])
                metrics.update({f"{protocol}_{k}": v for k, v in extra.items()})
        self.last_metrics[stage] = metrics
        self.last_outputs[stage] = out
        # Every process holds the same gathered values; averaging them across processes is a no-op.
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, prog_bar=False, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ---- optimisation ---------------------------------------------------------------------------

    def parameter_groups(self) -> list[dict[str, Any]]:
        skip = {f"encoder.{name}" for name in self.encoder.no_weight_decay()}
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if name in skip or (not name.startswith("encoder.") and param.dim() < 2):
                no_decay.append(param)
            else:
                decay.append(param)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(params=self.parameter_groups())
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(
            optimizer=optimizer, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
