"""A callback for DDP tests: each rank appends the rows of every training batch it gets to
`<out>/rank-<global rank>.jsonl` (loaded by the child processes through `+callbacks.x._target_`)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class RecordBatches(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        row = {"epoch": trainer.current_epoch, "step": batch_idx, "index": batch["index"].tolist()}
        with open(self.out / f"rank-{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
