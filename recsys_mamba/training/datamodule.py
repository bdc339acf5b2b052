"""`RecDataModule`: prepared Parquet (see `recsys_mamba.data`) to padded tensor batches.

Sequences are held as flat numpy arrays with per-user offsets; a batch is cut out of them in one
vectorised step (`__getitems__`), so there is no per-sample Python work.

- next_item, train: a user's training events shifted by one (input t predicts t + 1), so every prefix
  is trained; one row per user with the most recent `max_len` inputs, or with `next_item_windows`
  overlapping rows that together train every target (`NextItemTrainDataset`). With `positive_targets`, events
  labelled 0 (skipped impressions) are inputs but never targets.
- next_item, valid / test: one row per user, the first event of that split is the target and every
  earlier event (train, and valid for test) the history.
- ctr: one row per CTR sample; history = the user's most recent `max_len` events before it. For
  training, samples are by default grouped into shared history windows (`CTRWindowDataset`).

Rows are right-padded with 0 to the longest row of the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import polars as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from recsys_mamba.errors import RecsysError
from recsys_mamba.models.transitions import TransitionTable, consecutive_pairs

TASKS = ("next_item", "ctr")
SPLITS = {"train": 0, "valid": 1, "test": 2}
Batch = dict[str, torch.Tensor]


class SequenceStore:
    """All users' event sequences as flat arrays; `start[row]`, `length[row]` index them."""

    def __init__(self, sequences: pl.DataFrame) -> None:
        sequences = sequences.sort("user_idx")
        lengths = sequences["items"].list.len().to_numpy().astype(np.int64)
        self.users = sequences["user_idx"].to_numpy().astype(np.int64)
        self.length = lengths
        self.start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.flat: dict[str, np.ndarray] = {}
        for name in ("items", "categories", "event_types", "splits", "labels"):
            if name in sequences.columns:
                # An undefined click label (null) counts as a positive event: it is a real interaction.
                fill = 1 if name == "labels" else 0
                self.flat[name] = sequences[name].explode().fill_null(fill).to_numpy().astype(np.int64)
        if self.users.size and (self.users.min() < 0):
            raise RecsysError("sequences.parquet: user_idx must be >= 0")
        self.row_of_user = np.full(int(self.users.max(initial=0)) + 1, -1, dtype=np.int64)
        self.row_of_user[self.users] = np.arange(len(self.users))

    def split_positions(self) -> np.ndarray:
        """(n_users, 3): index within each user's sequence of the first train/valid/test event, or -1."""
        splits = self.flat["splits"]
        out = np.full((len(self.users), 3), -1, dtype=np.int64)
        row = np.repeat(np.arange(len(self.users)), self.length)
        pos = np.arange(splits.size) - np.repeat(self.start, self.length)
        for s in range(3):
            sel = splits == s
            # Sequences are chronological, so the first hit per row is the smallest position.
            first_rows, first_idx = np.unique(row[sel], return_index=True)
            out[first_rows, s] = pos[sel][first_idx]
        return out

    def gather(self, name: str, start: np.ndarray, length: np.ndarray, width: int) -> torch.Tensor:
        """Right-padded (B, width) rows flat[name][start : start + length]."""
        flat = self.flat[name]
        cols = np.arange(width)
        mask = cols[None, :] < length[:, None]
        idx = np.minimum(start[:, None] + cols[None, :], max(flat.size - 1, 0))
        return torch.from_numpy(np.where(mask, flat[idx] if flat.size else 0, 0))

    def history(self, start: np.ndarray, length: np.ndarray, min_width: int = 1) -> Batch:
        width = max(int(length.max(initial=0)), min_width)
        out = {
            name: self.gather(name, start, length, width)
            for name in ("items", "categories", "event_types")
            if name in self.flat
        }
        out["lengths"] = torch.from_numpy(length.copy())
        return out


class _BatchDataset(Dataset):
    """A dataset whose batches are built at once by `__getitems__`; use with `collate_batch`."""

    def __init__(self, store: SequenceStore, max_len: int) -> None:
        self.store = store
        self.max_len = max_len

    def __getitem__(self, index: int) -> Batch:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> Batch:
        idx = np.asarray(indices, dtype=np.int64)
        batch = self.build(idx)
        batch["index"] = torch.from_numpy(idx)
        return batch

    def build(self, idx: np.ndarray) -> Batch:
        raise NotImplementedError

    def lengths(self) -> np.ndarray:
        """Padded width each row needs (its history length), for length-bucketed batching."""
        raise NotImplementedError


class NextItemTrainDataset(_BatchDataset):
    """Training rows for next-click: inputs are a user's training events, targets the same shifted by one.

    Without `windows`, one row per user holds the most recent `max_len` inputs (the SASRec convention),
    so a user with more training events than that contributes only their last `max_len` targets.
    With `windows`, such a user gets overlapping rows ending every `max_len // 2` inputs back from the
    most recent one, and each target is trained in exactly one row: the one where it has the most
    context (at least `max_len - max_len // 2` earlier events, or all of them near the start). Every
    training target is then used, as when each prefix is its own sample, at about twice the encoder
    work for those users, where a sample per prefix would cost up to `max_len` times as much.
    """

    def __init__(
        self,
        store: SequenceStore,
        max_len: int,
        n_train: np.ndarray,
        positive_only: bool = True,
        windows: bool = False,
    ) -> None:
        super().__init__(store, max_len)
        self.positive_only = positive_only and "labels" in store.flat
        users = np.flatnonzero(n_train >= 2)
        n_inputs = n_train[users] - 1
        stride = max(max_len // 2, 1)
        # Windows beyond the most recent one: ceil((n_inputs - max_len) / stride), 0 when all fit.
        n_older = np.maximum(0, -((max_len - n_inputs) // stride)) if windows else np.zeros_like(n_inputs)
        per_user = n_older + 1
        self.rows = np.repeat(users, per_user)
        back = np.arange(per_user.sum()) - np.repeat(np.cumsum(per_user) - per_user, per_user)
        end = np.repeat(n_inputs, per_user) - back * stride
        self.offset = np.maximum(0, end - max_len)  # first input of the row, within the user's sequence
        self.length = end - self.offset
        # A row that starts at the user's first event trains all its targets; a later window only its
        # last `stride`, since the row before it (one stride older) gives the others more context.
        older_exists = windows & (self.offset > 0)
        self.first_target = np.where(older_exists, self.length - stride, 0)

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self) -> np.ndarray:
        return self.length

    def build(self, idx: np.ndarray) -> Batch:
        length = self.length[idx]
        start = self.store.start[self.rows[idx]] + self.offset[idx]
        batch = self.store.history(start, length)
        width = batch["items"].shape[1]
        trained = np.arange(width)[None, :] >= self.first_target[idx][:, None]
        if self.positive_only:
            # Skipped impressions (label 0) stay in the input history but are not targets to predict.
            trained &= self.store.gather("labels", start + 1, length, width).numpy() != 0
        targets = self.store.gather("items", start + 1, length, width)
        batch["targets"] = targets * torch.from_numpy(trained)
        return batch


class NextItemEvalDataset(_BatchDataset):
    def __init__(self, store: SequenceStore, max_len: int, target_pos: np.ndarray) -> None:
        super().__init__(store, max_len)
        self.rows = np.flatnonzero(target_pos >= 1)
        self.target_pos = target_pos[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self) -> np.ndarray:
        return np.minimum(self.target_pos, self.max_len)

    def build(self, idx: np.ndarray) -> Batch:
        rows = self.rows[idx]
        pos = self.target_pos[idx]
        length = np.minimum(pos, self.max_len)
        start = self.store.start[rows] + pos - length
        batch = self.store.history(start, length)
        batch["target"] = torch.from_numpy(self.store.flat["items"][self.store.start[rows] + pos])
        batch["users"] = torch.from_numpy(self.store.users[rows])
        # Every earlier item, not only the encoded window: the masked protocol removes the whole history.
        width = max(int(pos.max(initial=0)), 1)
        batch["history"] = self.store.gather("items", self.store.start[rows], pos, width)
        return batch


class CTRDataset(_BatchDataset):
    def __init__(self, store: SequenceStore, max_len: int, samples: pl.DataFrame) -> None:
        super().__init__(store, max_len)
        self.users = samples["user_idx"].to_numpy().astype(np.int64)
        self.items = samples["item_idx"].to_numpy().astype(np.int64)
        self.categories = samples["category_idx"].fill_null(0).to_numpy().astype(np.int64)
        self.labels = samples["label"].to_numpy().astype(np.float32)
        self.hist_len = samples["hist_len"].to_numpy().astype(np.int64)
        rows = store.row_of_user[np.minimum(self.users, len(store.row_of_user) - 1)]
        if (rows < 0).any() or (self.hist_len > store.length[np.maximum(rows, 0)]).any():
            raise RecsysError(
                "ctr.parquet refers to users or history lengths missing from sequences.parquet; "
                "re-run the data preparation (python -m recsys_mamba.prepare ... overwrite=true)"
            )
        self.rows = rows

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> np.ndarray:
        return np.minimum(self.hist_len, self.max_len)

    def build(self, idx: np.ndarray) -> Batch:
        hist = self.hist_len[idx]
        length = np.minimum(hist, self.max_len)
        start = self.store.start[self.rows[idx]] + hist - length
        batch = self.store.history(start, length)
        batch["cand_items"] = torch.from_numpy(self.items[idx])
        batch["cand_categories"] = torch.from_numpy(self.categories[idx])
        batch["labels"] = torch.from_numpy(self.labels[idx])
        batch["users"] = torch.from_numpy(self.users[idx])
        return batch


class CTRWindowDataset(_BatchDataset):
    """CTR training samples grouped by the stretch of history they need, each stretch encoded once.

    A causal encoder's output at position t depends only on events up to t, so all samples of a user
    whose history ends inside one window of `max_len` events share a single encoder pass. Windows
    start every `max_len // 2` events and a sample goes to the first window reaching its last
    history event, so it sees between `max_len // 2` and `max_len` events of context (all of them
    when the user has fewer). Rows are windows; `sample_window` maps each sample to its row and
    `sample_hist` is its history length inside that window.
    """

    def __init__(self, samples: CTRDataset) -> None:
        super().__init__(samples.store, samples.max_len)
        self.samples = samples
        stride = max(self.max_len // 2, 1)
        window = np.maximum(0, -((self.max_len - samples.hist_len) // stride))  # ceil((h - max_len) / stride)
        order = np.lexsort((samples.hist_len, window, samples.rows))
        key = np.stack([samples.rows[order], window[order]])
        change = np.flatnonzero(np.any(key[:, 1:] != key[:, :-1], axis=0)) + 1
        self.bounds = np.concatenate([[0], change, [len(order)]])
        self.order = order
        first = order[self.bounds[:-1]]
        self.win_row = samples.rows[first]
        self.win_start = window[first] * stride
        last = order[self.bounds[1:] - 1]
        self.win_len = samples.hist_len[last] - self.win_start

    def __len__(self) -> int:
        return len(self.win_row)

    def lengths(self) -> np.ndarray:
        return self.win_len

    def build(self, idx: np.ndarray) -> Batch:
        batch = self.store.history(
            self.store.start[self.win_row[idx]] + self.win_start[idx], self.win_len[idx]
        )
        counts = self.bounds[idx + 1] - self.bounds[idx]
        sample_window = np.repeat(np.arange(len(idx)), counts)
        picks = self.order[np.concatenate([np.arange(self.bounds[i], self.bounds[i + 1]) for i in idx])]
        s = self.samples
        batch["sample_window"] = torch.from_numpy(sample_window)
        batch["sample_hist"] = torch.from_numpy(s.hist_len[picks] - self.win_start[idx][sample_window])
        batch["cand_items"] = torch.from_numpy(s.items[picks])
        batch["cand_categories"] = torch.from_numpy(s.categories[picks])
        batch["labels"] = torch.from_numpy(s.labels[picks])
        batch["users"] = torch.from_numpy(s.users[picks])
        return batch


class LengthBucketBatchSampler(Sampler[list[int]]):
    """Batches of rows with similar lengths, so little of each padded batch is padding.

    Each epoch the seeded `DistributedSampler` order is cut into pools of `pool_batches` batches, each
    pool is sorted by row length and cut into batches, and the batch order is shuffled. Like the plain
    sampler, the order depends only on (seed, epoch), so a resumed run sees the same batches.
    """

    def __init__(
        self, sampler: DistributedSampler, lengths: np.ndarray, batch_size: int, pool_batches: int = 64
    ) -> None:
        self.sampler = sampler
        self.lengths = np.asarray(lengths)
        self.batch_size = int(batch_size)
        self.pool = int(batch_size) * int(pool_batches)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def _batches(self) -> list[list[int]]:
        order = np.fromiter(iter(self.sampler), dtype=np.int64)
        batches: list[list[int]] = []
        for lo in range(0, len(order), self.pool):
            pool = order[lo : lo + self.pool]
            pool = pool[np.argsort(self.lengths[pool], kind="stable")]
            batches += [pool[i : i + self.batch_size].tolist() for i in range(0, len(pool), self.batch_size)]
        rng = np.random.default_rng([self.sampler.seed, self.sampler.epoch])
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        n = len(self.sampler)
        full, rest = divmod(n, self.pool)
        return full * -(-self.pool // self.batch_size) + -(-rest // self.batch_size)


def collate_batch(batch: Batch) -> Batch:
    """The dataset already returns a whole batch (`__getitems__`)."""
    return batch


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
        cache_dir: str | None = None,
        prepared_dir: str | None = None,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise RecsysError(f"task.name must be one of {TASKS}, got {task!r}")
        if max_len <= 0:
            raise RecsysError(f"max_len must be > 0, got {max_len}; set e.g. model.max_len=50")
        self.data_cfg = data
        self.task = task
        self.max_len = int(max_len)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.seed = int(seed)
        self.positive_targets = bool(positive_targets)
        self.ctr_train_windows = bool(ctr_train_windows)
        self.next_item_windows = bool(next_item_windows)
        self.bucket_by_length = bool(bucket_by_length)
        self.cache_dir = cache_dir
        self.prepared_dir = Path(prepared_dir) if prepared_dir else None
        self.manifest: dict[str, Any] = {}
        self.datasets: dict[str, _BatchDataset] = {}
        self.item_counts: np.ndarray | None = None
        self.item_attributes: np.ndarray | None = None  # (n_items + 1, K) attribute ids, if any
        self.ctr_train: pl.DataFrame | None = None
        self.store: SequenceStore | None = None  # next_item: every user's events
        self.n_train: np.ndarray | None = None  # next_item: each user's training events (a prefix)

    # ---- preparation ----------------------------------------------------------------------------

    def prepare_data(self) -> None:
        self.prepared_path()

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
            from omegaconf import OmegaConf

            data_cfg = OmegaConf.to_container(data_cfg, resolve=True)
        kwargs = {"cache_dir": self.cache_dir} if self.cache_dir else {}
        self.prepared_dir = Path(prepare(data_cfg, **kwargs))
        return self.prepared_dir

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        from recsys_mamba.data import load_item_attributes, load_manifest

        folder = self.prepared_path()
        self.manifest = dict(load_manifest(folder))
        self.item_attributes = load_item_attributes(folder)
        store = SequenceStore(_read(folder, "sequences.parquet"))
        items = _read(folder, "item_map.parquet", columns=["item_idx", "count"])
        counts = np.zeros(int(self.manifest["n_items"]) + 1, dtype=np.float64)
        counts[items["item_idx"].to_numpy()] = items["count"].to_numpy()
        self.item_counts = counts
        if self.task == "next_item":
            first = store.split_positions()
            n_train = np.where(
                first[:, 1] >= 0, first[:, 1], np.where(first[:, 2] >= 0, first[:, 2], store.length)
            )
            self.store, self.n_train = store, n_train
            self.datasets = {
                "train": NextItemTrainDataset(
                    store, self.max_len, n_train, self.positive_targets, self.next_item_windows
                ),
                "valid": NextItemEvalDataset(store, self.max_len, first[:, 1]),
                "test": NextItemEvalDataset(store, self.max_len, first[:, 2]),
            }
        else:
            if not self.manifest.get("ctr"):
                raise RecsysError(
                    f"task=ctr needs CTR samples but the prepared data at {folder} has none; "
                    "pick a data config with CTR enabled (e.g. data=synthetic or data=ml1m_ctr) "
                    "or task=next_item"
                )
            samples = _read(folder, "ctr.parquet")
            self.ctr_train = samples.filter(pl.col("split") == SPLITS["train"])
            self.datasets = {
                name: CTRDataset(store, self.max_len, samples.filter(pl.col("split") == code))
                for name, code in SPLITS.items()
            }
            if self.ctr_train_windows:
                self.datasets["train"] = CTRWindowDataset(self.datasets["train"])
        for name, ds in self.datasets.items():
            if len(ds) == 0:
                raise RecsysError(
                    f"the prepared data at {folder} has no {name} samples for task={self.task}; "
                    "check the data config's split settings or use a larger data set"
                )

    @property
    def sizes(self) -> dict[str, int]:
        """Vocabulary sizes for the encoder."""
        return {
            "n_items": int(self.manifest["n_items"]),
            "n_categories": int(self.manifest.get("n_categories") or 0),
            "n_event_types": int(self.manifest.get("n_event_types") or 0),
        }

    def transition_table(self) -> TransitionTable:
        """Counts of every pair of consecutive training events, for a head's transition prior."""
        if self.store is None or self.n_train is None:
            raise RecsysError(
                "head.transition_prior counts next_item training sequences: use task=next_item (setup first)"
            )
        pairs = consecutive_pairs(self.store.flat["items"], self.store.start, self.n_train)
        return TransitionTable(int(self.manifest["n_items"]), *pairs)

    @property
    def encoder_inputs(self) -> dict[str, Any]:
        """What the data gives an encoder's constructor: `sizes`, and the item attribute table if any."""
        if self.item_attributes is None:
            return dict(self.sizes)
        return {**self.sizes, "item_attributes": torch.from_numpy(self.item_attributes)}

    # ---- loaders --------------------------------------------------------------------------------

    def _loader(
        self, split: str, batch_size: int, sampler: Any = None, batch_sampler: Any = None
    ) -> DataLoader:
        by_batch = {"batch_sampler": batch_sampler} if batch_sampler is not None else {}
        return DataLoader(
            self.datasets[split],
            **(by_batch or {"batch_size": batch_size, "sampler": sampler, "shuffle": False}),
            collate_fn=collate_batch,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_rows_per_batch(self) -> int:
        """`batch_size` counts samples; grouped CTR windows hold several, so fewer rows make a batch."""
        ds = self.datasets["train"]
        if isinstance(ds, CTRWindowDataset):
            return max(1, round(self.batch_size * len(ds) / max(len(ds.samples), 1)))
        return self.batch_size

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # A seeded sampler whose order depends only on (seed, epoch): a resumed run sees the same batches.
        sampler = DistributedSampler(
            self.datasets["train"],
            num_replicas=world,
            rank=rank,
            shuffle=True,
            seed=self.seed,
            drop_last=False,
        )
        if self.bucket_by_length:
            if world > 1:
                raise RecsysError(
                    "datamodule.bucket_by_length=true is not supported with more than one process yet; "
                    "set datamodule.bucket_by_length=false for DDP runs"
                )
            rows = self.train_rows_per_batch()
            buckets = LengthBucketBatchSampler(sampler, self.datasets["train"].lengths(), rows)
            return self._loader("train", rows, batch_sampler=buckets)
        return self._loader("train", self.train_rows_per_batch(), sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)


def _read(folder: Path, name: str, columns: list[str] | None = None) -> pl.DataFrame:
    path = folder / name
    if not path.is_file():
        raise RecsysError(
            f"{path} is missing from the prepared data; re-run python -m recsys_mamba.prepare with "
            "overwrite=true (or delete the cache folder) so it is rebuilt"
        )
    return pl.read_parquet(path, columns=columns)
