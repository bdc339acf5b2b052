"""The memory-mapped sequence store: the same values as the in-memory one, built once per prepared
folder, never trusted half-built, rebuilt when stale, and kept out of read-only folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_mamba.errors import RecsysError
from recsys_mamba.sequences import PreparedData, SequenceStore, mapped
from recsys_mamba.sequences.store import EVENT_ARRAYS


def arrays(store: SequenceStore) -> dict[str, np.ndarray]:
    out = {"users": store.users, "start": store.start, "length": store.length, "first": store.first}
    return {**out, **store.flat}


def test_mapped_store_equals_the_in_memory_one_across_read_batches(prepared, monkeypatch) -> None:
    monkeypatch.setattr(mapped, "BATCH_USERS", 7)  # several reads, so offsets continue across them
    store = mapped.open_store(prepared)
    memory = SequenceStore.from_frame(pl.read_parquet(prepared / "sequences.parquet"))
    got, want = arrays(store), arrays(memory)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), want[name], err_msg=name)
    assert isinstance(store.flat["items"], np.memmap) and store.flat["items"].dtype == np.int32
    assert store.flat["labels"].dtype == np.int8 == EVENT_ARRAYS["labels"]
    rows = np.arange(len(store.users))
    batch = store.history(store.start[rows], store.length[rows])
    assert batch["items"].dtype.is_floating_point is False and str(batch["items"].dtype) == "torch.int64"
    assert batch["items"].equal(memory.history(memory.start, memory.length)["items"])


def test_int32_only_where_the_values_fit(prepared) -> None:
    seq = pl.read_parquet(prepared / "sequences.parquet")
    assert seq.schema["items"] == pl.List(pl.Int32)  # the prepared width: fits by its type
    wide = seq.with_columns(pl.col("items").cast(pl.List(pl.Int64)), pl.col("splits").cast(pl.List(pl.Int64)))
    small = SequenceStore.from_frame(wide)  # int64 columns whose values fit
    assert small.flat["items"].dtype == np.int32 and small.flat["splits"].dtype == np.int8
    big = wide.with_columns(pl.col("items").list.eval(pl.element() + 2**31))
    big.write_parquet(prepared / "sequences.parquet")
    for store in (SequenceStore.from_frame(big), mapped.open_store(prepared)):
        assert store.flat["items"].dtype == np.int64 and store.flat["splits"].dtype == np.int8
        np.testing.assert_array_equal(np.asarray(store.flat["items"]), big["items"].explode().to_numpy())


def test_store_is_built_once_and_rebuilt_when_sequences_change(prepared) -> None:
    mapped.open_store(prepared)
    index = prepared / "store" / "store.json"
    built = index.stat().st_mtime_ns
    mapped.open_store(prepared)
    assert index.stat().st_mtime_ns == built  # reused
    seq = pl.read_parquet(prepared / "sequences.parquet")
    seq.head(5).write_parquet(prepared / "sequences.parquet")
    assert len(mapped.open_store(prepared).users) == 5  # the old store is stale: rebuilt


def test_a_half_built_store_is_never_trusted(prepared) -> None:
    mapped.open_store(prepared)
    store = prepared / "store"
    # A killed builder's temporary folder beside it, and a store whose file was cut short.
    leftover = prepared / f".store.tmp-{_host()}-999999-0123abcd"
    leftover.mkdir()
    (leftover / "items.bin").write_bytes(b"partial")
    with open(store / "items.bin", "r+b") as f:
        f.truncate(3)
    fresh = mapped.open_store(prepared)
    memory = SequenceStore.from_frame(pl.read_parquet(prepared / "sequences.parquet"))
    np.testing.assert_array_equal(np.asarray(fresh.flat["items"]), memory.flat["items"])
    assert not leftover.exists()


def _host() -> str:
    from recsys_mamba.data.cache import _host as host

    return host()


def test_a_read_only_prepared_folder_gets_its_store_in_the_cache(prepared, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(mapped.STORE_DIR_ENV, str(tmp_path / "stores"))
    monkeypatch.setattr(mapped, "_writable", lambda folder: False)
    before = sorted(p.name for p in prepared.iterdir())
    data = PreparedData.open(prepared)
    assert len(data.store.users) == 40
    assert sorted(p.name for p in prepared.iterdir()) == before  # nothing written into the folder
    (built,) = (p for p in (tmp_path / "stores").iterdir() if not p.name.startswith("."))
    assert (
        built.name.startswith("prepared-") and json.loads((built / "store.json").read_text())["format"] == 1
    )


def test_a_full_disk_is_a_clear_error_and_leaves_no_store(prepared, monkeypatch) -> None:
    real_open = open

    def full(path, mode="r", *args, **kwargs):
        return real_open(
            "/dev/full" if "w" in mode and str(path).endswith(".bin") else path, mode, *args, **kwargs
        )

    if not Path("/dev/full").exists():
        pytest.skip("/dev/full is needed for a real ENOSPC")
    monkeypatch.setattr(mapped, "open", full, raising=False)
    with pytest.raises(RecsysError) as err:
        mapped.open_store(prepared)
    message = str(err.value)
    assert "No space left on device" in message and "RECSYS_STORE_DIR" in message, message
    assert not (prepared / "store").exists()
    assert not [p for p in prepared.iterdir() if p.name.startswith(".store.tmp")]
    monkeypatch.undo()
    assert len(mapped.open_store(prepared).users) == 40  # space freed: it builds


def test_missing_sequences_is_a_clear_error(prepared) -> None:
    os.remove(prepared / "sequences.parquet")
    with pytest.raises(RecsysError, match=r"sequences\.parquet is missing"):
        mapped.open_store(prepared)
