"""`NonFiniteLossGuard`: stop training at the first NaN/inf loss (or gradient) with a message that says
where it happened and which checkpoint still holds good weights."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from recsys_mamba.errors import RecsysError


def last_good_checkpoint(trainer: L.Trainer) -> str:
    """Where the newest checkpoint (written before the fault) is and how to resume, or "none saved yet"."""
    last, best = "", ""
    for cb in trainer.checkpoint_callbacks:
        # A checkpoint callback without a monitor keeps the latest epoch (conf/callbacks/last_checkpoint.yaml)
        newest = getattr(cb, "last_model_path", "") or ("" if cb.monitor else cb.best_model_path)
        last = last or newest or ""
        best = best or (cb.best_model_path if cb.monitor else "") or ""
    if not last:
        return best or "none saved yet"
    also = f"; best so far: {best}" if best and best != last else ""
    return f"{last} (resume with ckpt_path={last}{also})"


class NonFiniteLossGuard(Callback):
    """Raise a `RecsysError` before the backward pass of a non-finite loss, so no NaN reaches the weights.

    With `check_grads`, gradients are checked too (after unscaling, before the optimizer step); that costs
    one pass over the parameters per step, and is skipped under 16-mixed, whose grad scaler expects and
    skips inf gradients on its own.
    """

    def __init__(self, check_grads: bool = False) -> None:
        self.check_grads = bool(check_grads)
        self._batch_idx = -1

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx

    def _where(self, trainer: L.Trainer) -> str:
        return f"epoch {trainer.current_epoch}, global step {trainer.global_step}, batch {self._batch_idx}"

    def _hint(self, trainer: L.Trainer) -> str:
        precision = str(getattr(trainer, "precision", "32"))
        return (
            f"Last good checkpoint: {last_good_checkpoint(trainer)}. Training stopped; try a lower "
            "module.optimizer.lr, check the input data for extreme or corrupt values, or train with "
            f"trainer.precision=32 (now {precision})."
        )

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        # One scalar copy per step: cheap next to the step itself, and it stops before NaN gradients exist.
        finite = bool(torch.isfinite(loss.detach()).all())
        # Every process must stop together, or the others wait forever in the gradient all-reduce.
        if not trainer.strategy.reduce_boolean_decision(not finite, all=False):
            return
        value = "finite here, not on another rank" if finite else loss.detach().float().reshape(-1)[0].item()
        raise RecsysError(
            f"non-finite training loss ({value}) at {self._where(trainer)}. {self._hint(trainer)}"
        )

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.check_grads or str(getattr(trainer, "precision", "")) == "16-mixed":
            return
        grads = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        if not grads:
            return
        finite = torch.stack([torch.isfinite(g).all() for _, g in grads])
        if bool(finite.all()):
            return
        bad = [n for (n, _), ok in zip(grads, finite.tolist(), strict=True) if not ok]
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise RecsysError(
            f"non-finite gradients in {shown} at {self._where(trainer)} (the loss was finite). "
            f"{self._hint(trainer)}"
        )
