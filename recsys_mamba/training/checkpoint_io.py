"""Lightning's checkpoint IO, backed by `runs.checkpoint`: atomic writes stamped with the run's
metadata, weights-only reads checked against it."""

from __future__ import annotations

import functools
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig
from torch import nn

from recsys_mamba.runs.checkpoint import expected, read_checkpoint, run_metadata, save_checkpoint, stamp
from recsys_mamba.sequences.prepared import PreparedData


class AtomicCheckpointIO(TorchCheckpointIO):
    """`metadata` (from `runs.checkpoint.run_metadata`) is embedded in every checkpoint saved; `expect` is
    what every checkpoint loaded must match. Stamping here rather than in a callback also covers
    weights-only saves, for which Lightning calls no callback hooks."""

    def __init__(
        self,
        metadata: dict[str, Any] | None = None,
        expect: dict[str, Any] | None = None,
        vocabulary: PreparedData | None = None,
    ) -> None:
        super().__init__()
        self.metadata = metadata
        self.expect = expect
        self.data = vocabulary  # its item table goes into every checkpoint: a checkpoint alone scores

    @functools.cached_property
    def vocabulary(self) -> dict[str, Any] | None:
        return None if self.data is None else self.data.vocabulary().payload()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if self.metadata is not None:
            checkpoint = stamp(checkpoint, self.metadata, self.vocabulary)
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own writer
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_checkpoint(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # weights_only is ignored on purpose: a checkpoint is never unpickled beyond tensors and primitives.
        return read_checkpoint(path, expect=self.expect, map_location=map_location or "cpu")


def run_checkpoint_io(
    cfg: DictConfig, data: PreparedData, encoder: nn.Module, head: nn.Module
) -> AtomicCheckpointIO:
    """The checkpoint IO of a run: stamps this run's metadata, accepts only checkpoints that match it."""
    meta = run_metadata(cfg, data.sizes, dict(data.manifest), encoder, head)
    return AtomicCheckpointIO(metadata=meta, expect=expected(meta), vocabulary=data)
