"""`RecLitModule`: an injected sequence encoder + task head, trained and evaluated by Lightning; what
differs between tasks (loss, evaluation outputs, metrics) is the task's (`recsys_mamba.tasks`)."""

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

from recsys_mamba.errors import RecsysError
from recsys_mamba.tasks import get_task
from recsys_mamba.tasks.base import unique_by_index

Batch = dict[str, Tensor]


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


class RecLitModule(L.LightningModule):
    """Trains `encoder` + `head` for `task` (a name in `recsys_mamba.tasks.TASKS`).

    `optimizer` and `scheduler` are partials (`_partial_: true` configs): `optimizer(params)` and
    `scheduler(optimizer, total_steps=...)`. Parameters the encoder lists in `no_weight_decay()`, and
    every 1-D head parameter, are put in a group with weight decay 0.

    `loss_weighting`: "batch" takes each batch's mean loss, so a batch of short rows (few targets)
    weighs as much as one of long rows; "target" scales it by the batch's targets over its rows x the
    training set's mean targets per row, so every target weighs the same wherever it is batched
    (with `bucket_by_length` the batches differ in targets per row many times over).
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
        loss_weighting: str = "batch",
    ) -> None:
        super().__init__()
        if loss_weighting not in ("batch", "target"):
            raise RecsysError(f"module.loss_weighting={loss_weighting!r}: use batch or target")
        # The optimizer/scheduler partials stay out of the hyperparameters: pickled into checkpoints they
        # would make them unloadable with torch.load(weights_only=True).
        self.save_hyperparameters(
            logger=False, ignore=["encoder", "head", "item_counts", "optimizer", "scheduler"]
        )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.encoder = encoder
        self.head = head
        self.task = get_task(task)
        counts = torch.as_tensor(item_counts if item_counts is not None else np.ones(1), dtype=torch.float32)
        probs = (counts + 1.0) / (counts + 1.0).sum()
        self.register_buffer("item_log_probs", probs.log(), persistent=False)
        self._outputs: dict[str, dict[str, list[Tensor]]] = {}
        self.last_metrics: dict[str, dict[str, float]] = {}
        # Per-sample outputs of the last validation/test epoch (index-aligned), for evaluation reports.
        self.last_outputs: dict[str, dict[str, np.ndarray]] = {}
        self.targets_per_row: float | None = None  # set at fit start with loss_weighting="target"

    # ---- training -------------------------------------------------------------------------------

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        # Re-seed per batch: dropout then depends only on (seed, epoch, batch, rank), never on whatever
        # else drew random numbers before, so a run resumed from a checkpoint continues exactly like
        # the uninterrupted run.
        step = self.current_epoch * 1_000_003 + batch_idx
        torch.manual_seed((self.hparams.seed * 1_000_033 + step) * 64 + self.global_rank)

    def on_fit_start(self) -> None:
        if self.hparams.loss_weighting != "target":
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or "train" not in getattr(datamodule, "datasets", {}):
            raise RecsysError(
                "module.loss_weighting=target reads the training set's targets per row from a "
                "RecDataModule: fit with datamodule=..., or use loss_weighting=batch"
            )
        self.targets_per_row = datamodule.datasets["train"].targets_per_row()

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = self.task.loss(self, batch, self.item_log_probs)
        n = self.task.samples(batch)
        if self.targets_per_row:
            rows = len(batch["index"])
            loss = loss * (self.task.loss_targets(batch) / (rows * self.targets_per_row))
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        for name, value in self.task.train_logs(self).items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=n)
        return loss

    # ---- evaluation -----------------------------------------------------------------------------

    def _eval_step(self, stage: str, batch: Batch) -> None:
        out = self._outputs.setdefault(stage, {})
        for key, value in self.task.eval_outputs(self, batch).items():
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
        return unique_by_index({key: value.cpu().numpy() for key, value in cat.items()})

    def _eval_epoch_end(self, stage: str) -> None:
        out = self._gathered(stage)
        if not out:
            return
        metrics = self.task.metrics(out)
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
