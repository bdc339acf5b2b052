"""Exponential moving average of the weights, for validation, the saved checkpoints and the test."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

from recsys_mamba.errors import RecsysError


class WeightEMA(EMAWeightAveraging):
    """Lightning's EMA callback, except that testing or validating a checkpoint uses its averaged weights.

    Lightning's callback saves the averaged weights as the checkpoint's `state_dict` and the raw ones
    beside them, and loads the raw ones back whenever the trainer that fitted tests a checkpoint:
    `train` tests the best epoch that way. Only resuming a fit needs the raw weights.
    """

    def __init__(self, decay: float = 0.999, **kwargs: Any) -> None:
        if not 0.0 <= decay < 1.0:
            raise RecsysError(
                f"callbacks.ema.decay={decay} must be in [0, 1): the share of the average each step "
                "keeps, e.g. 0.999"
            )
        super().__init__(decay=decay, **kwargs)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
