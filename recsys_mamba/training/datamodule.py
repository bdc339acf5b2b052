"""`RecDataModule`: prepares the data (or reuses its cache), asks the task for its datasets
(`recsys_mamba.sequences`) and hands Lightning the loaders."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, DistributedSampler

from recsys_mamba.errors import RecsysError
from recsys_mamba.sequences import BatchDataset, LengthBucketBatchSampler, PreparedData, collate_batch
from recsys_mamba.sequences.mapped import open_store
from recsys_mamba.tasks import get_task
from recsys_mamba.tasks.base import DataSettings, HeadInputs


class RecDataModule(L.LightningDataModule):
    """Reads (and if needed first prepares) the pipeline's output for one task."""

    def __init__(
        self,
        data: Mapping[str, Any],
        task: str = "next_item",
        max_len: int = 50,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 42,
        positive_targets: bool = True,
        ctr_train_windows: bool = True,
        next_item_windows: bool = True,
        bucket_by_length: bool = False,
        train_on_valid: bool = False,
        cache_dir: str | None = None,
        prepared_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.data_cfg = data
        self.task = get_task(task)
        self.settings = DataSettings(
            max_len=int(max_len),
            positive_targets=bool(positive_targets),
            next_item_windows=bool(next_item_windows),
            ctr_train_windows=bool(ctr_train_windows),
            train_on_valid=bool(train_on_valid),
        )
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.seed = int(seed)
        self.bucket_by_length = bool(bucket_by_length)
        self.cache_dir = cache_dir
        self.prepared_dir = Path(prepared_dir) if prepared_dir else None
        self.prepared: PreparedData | None = None
        self.datasets: dict[str, BatchDataset] = {}

    # ---- preparation ----------------------------------------------------------------------------

    def prepare_data(self) -> None:
        # Lightning calls this in one process per node before the others set up: it builds the
        # memory-mapped sequence store that every rank then maps (`sequences.mapped`).
        open_store(self.prepared_path())

    def prepared_path(self) -> Path:
        """The prepared folder; runs the pipeline (or reuses its cache) unless `prepared_dir` is given."""
        if self.prepared_dir is not None:
            if not (self.prepared_dir / "manifest.json").is_file():
                raise RecsysError(
                    f"datamodule.prepared_dir={self.prepared_dir} holds no manifest.json; point it at a "
                    "folder written by python -m recsys_mamba.prepare, or set it to null"
                )
            return self.prepared_dir
        from recsys_mamba.data import prepare

        data_cfg = self.data_cfg
        if isinstance(data_cfg, DictConfig):
            data_cfg = OmegaConf.to_container(data_cfg, resolve=True)
        kwargs = {"cache_dir": self.cache_dir} if self.cache_dir else {}
        self.prepared_dir = Path(prepare(data_cfg, **kwargs))
        return self.prepared_dir

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.prepared = PreparedData.open(self.prepared_path())
        self.datasets = self.task.datasets(self.prepared, self.settings)
        for name, ds in self.datasets.items():
            if len(ds) == 0:
                raise RecsysError(
                    f"the prepared data at {self.prepared.folder} has no {name} samples for "
                    f"task={self.task.name}; check the data config's split settings or use a larger data set"
                )

    def _data(self) -> PreparedData:
        if self.prepared is None:
            raise RecsysError("RecDataModule: call setup() first")
        return self.prepared

    @property
    def manifest(self) -> dict[str, Any]:
        return self._data().manifest

    @property
    def sizes(self) -> dict[str, int]:
        """Vocabulary sizes for the encoder."""
        return self._data().sizes

    @property
    def encoder_inputs(self) -> dict[str, Any]:
        """What the data gives an encoder's constructor: `sizes`, and the item attribute table if any."""
        return self._data().encoder_inputs()

    @property
    def head_inputs(self) -> HeadInputs:
        return self.task.head_inputs(self._data(), self.datasets)

    @property
    def item_counts(self) -> np.ndarray:
        """Training interactions by item_idx (0 = padding)."""
        return self._data().items.counts

    # ---- loaders --------------------------------------------------------------------------------

    def _loader(self, split: str, batch_size: int | None, sampler: Any = None) -> DataLoader:
        """`batch_size=None`: the sampler yields whole batches (`LengthBucketBatchSampler`)."""
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            collate_fn=collate_batch,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        train = self.datasets["train"]
        rows = train.rows_per_batch(self.batch_size)  # `batch_size` counts samples
        if self.bucket_by_length:
            # Each rank gets disjoint batches of similar lengths, as many as every other rank.
            buckets = LengthBucketBatchSampler(train.lengths(), rows, world, rank, seed=self.seed)
            return self._loader("train", None, buckets)
        # A seeded sampler whose order depends only on (seed, epoch): a resumed run sees the same batches.
        sampler = DistributedSampler(
            train, num_replicas=world, rank=rank, shuffle=True, seed=self.seed, drop_last=False
        )
        return self._loader("train", rows, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)
