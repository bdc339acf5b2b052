"""Prepared Parquet (`recsys_mamba.data`) to padded tensor batches, for every consumer: training,
evaluation, scoring and the benchmarks. No Lightning, no models."""

from recsys_mamba.sequences.datasets import (
    BatchDataset,
    CTRDataset,
    CTRWindowDataset,
    NextItemEvalDataset,
    NextItemTrainDataset,
    collate_batch,
)
from recsys_mamba.sequences.padding import gather_last, last_positions, pad_right
from recsys_mamba.sequences.prepared import ItemTable, PreparedData
from recsys_mamba.sequences.samplers import LengthBucketBatchSampler
from recsys_mamba.sequences.store import SPLITS, SequenceStore

__all__ = [
    "SPLITS",
    "BatchDataset",
    "CTRDataset",
    "CTRWindowDataset",
    "ItemTable",
    "LengthBucketBatchSampler",
    "NextItemEvalDataset",
    "NextItemTrainDataset",
    "PreparedData",
    "SequenceStore",
    "collate_batch",
    "gather_last",
    "last_positions",
    "pad_right",
]
