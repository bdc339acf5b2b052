import numpy as np
import pytest
import torch

from recsys_mamba.errors import RecsysError
from recsys_mamba.training.datamodule import RecDataModule


def _dm(prepared, task="next_item", max_len=5, **kw):
    dm = RecDataModule(
        data={}, task=task, max_len=max_len, batch_size=8, eval_batch_size=8, prepared_dir=str(prepared), **kw
    )
    dm.setup()
    return dm


def _sequences(prepared):
    import polars as pl

    return {r["user_idx"]: r for r in pl.read_parquet(prepared / "sequences.parquet").to_dicts()}


def test_next_item_train_rows_are_shifted_truncated_and_right_padded(prepared):
    dm = _dm(prepared, next_item_windows=False)
    seqs = _sequences(prepared)
    ds = dm.datasets["train"]
    batch = ds.__getitems__(list(range(len(ds))))
    for row in range(len(ds)):
        user = int(ds.store.users[ds.rows[row]])
        train_items = [i for i, s in zip(seqs[user]["items"], seqs[user]["splits"], strict=True) if s == 0]
        n = min(len(train_items) - 1, 5)
        items, targets = batch["items"][row].tolist(), batch["targets"][row].tolist()
        assert items[:n] == train_items[:-1][-n:]  # the most recent inputs are kept
        assert targets[:n] == train_items[1:][-n:]  # each position predicts the next event
        assert all(v == 0 for v in items[n:] + targets[n:])  # right padding
        assert batch["lengths"][row] == n
    assert batch["items"].dtype == torch.int64 and batch["categories"].shape == batch["items"].shape


@pytest.mark.parametrize("max_len", [5, 6])
def test_next_item_windows_train_every_target_once_with_most_context(prepared, max_len):
    seqs = _sequences(prepared)
    last_only = _dm(prepared, max_len=max_len, next_item_windows=False).datasets["train"]
    ds = _dm(prepared, max_len=max_len).datasets["train"]  # windows are the default
    assert len(ds) > len(last_only)  # users longer than max_len get several rows
    batch = ds.__getitems__(list(range(len(ds))))
    stride = max_len // 2
    trained: dict[int, list[int]] = {}
    for row in range(len(ds)):
        user = int(ds.store.users[ds.rows[row]])
        columns = (seqs[user][k] for k in ("items", "splits", "labels"))
        events = [(i, lab) for i, s, lab in zip(*columns, strict=True) if s == 0]
        items, targets = batch["items"][row].tolist(), batch["targets"][row].tolist()
        n = int(batch["lengths"][row])
        offset = int(ds.offset[row])
        assert 1 <= n <= max_len and items[:n] == [i for i, _ in events[offset : offset + n]]
        for pos in range(n):
            target, label = events[offset + pos + 1]
            if targets[pos]:
                assert targets[pos] == target and label != 0
                # Context: every earlier event, or at least max_len - stride of them.
                assert offset == 0 or pos >= n - stride
                trained.setdefault(user, []).append(offset + pos + 1)
        assert all(v == 0 for v in items[n:] + targets[n:])
    for user, positions in trained.items():
        events = [lab for s, lab in zip(seqs[user]["splits"], seqs[user]["labels"], strict=True) if s == 0]
        expected = [p for p in range(1, len(events)) if events[p] != 0]
        assert sorted(positions) == expected  # each clicked training event is a target exactly once
    # Each user's newest row holds the same inputs as the one row without windows.
    _, newest = np.unique(ds.rows, return_index=True)
    plain = last_only.__getitems__(list(range(len(last_only))))
    assert torch.equal(ds.__getitems__(newest.tolist())["items"], plain["items"])


def test_next_item_eval_target_is_first_event_of_split(prepared):
    dm = _dm(prepared, max_len=50)
    seqs = _sequences(prepared)
    for split, code in (("valid", 1), ("test", 2)):
        ds = dm.datasets[split]
        batch = ds.__getitems__([0, 1, 2])
        for row in range(3):
            seq = seqs[int(batch["users"][row])]
            pos = seq["splits"].index(code)
            assert batch["target"][row] == seq["items"][pos]
            assert batch["items"][row, : batch["lengths"][row]].tolist() == seq["items"][:pos]


def test_ctr_rows_carry_history_candidate_and_label(prepared):
    import polars as pl

    dm = _dm(prepared, task="ctr", max_len=3, ctr_train_windows=False)
    seqs = _sequences(prepared)
    samples = pl.read_parquet(prepared / "ctr.parquet").filter(pl.col("split") == 0)
    ds = dm.datasets["train"]
    assert len(ds) == len(samples)
    batch = ds.__getitems__([0, 5, 9])
    for row, idx in enumerate([0, 5, 9]):
        sample = samples.row(idx, named=True)
        history = seqs[sample["user_idx"]]["items"][: sample["hist_len"]][-3:]
        assert batch["items"][row, : len(history)].tolist() == history
        assert batch["cand_items"][row] == sample["item_idx"]
        assert batch["labels"][row] == sample["label"]


def test_train_order_depends_only_on_seed_and_epoch(prepared):
    def order(epoch, seed=3):
        loader = _dm(prepared, seed=seed).train_dataloader()
        loader.sampler.set_epoch(epoch)
        return torch.cat([b["index"] for b in loader]).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(1)) == list(range(len(order(1))))


def test_ctr_on_data_without_ctr_is_a_clear_error(prepared):
    import json

    manifest = json.loads((prepared / "manifest.json").read_text())
    manifest["ctr"] = None
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RecsysError, match="task=ctr needs CTR samples"):
        _dm(prepared, task="ctr")


def test_missing_prepared_file_is_a_clear_error(prepared):
    (prepared / "sequences.parquet").unlink()
    with pytest.raises(RecsysError, match=r"sequences\.parquet is missing"):
        _dm(prepared)


def test_bad_max_len_is_rejected(prepared):
    with pytest.raises(RecsysError, match="max_len"):
        RecDataModule(data={}, max_len=0, prepared_dir=str(prepared))


def test_item_counts_follow_item_map(prepared):
    import polars as pl

    dm = _dm(prepared)
    item_map = pl.read_parquet(prepared / "item_map.parquet")
    assert dm.item_counts[0] == 0
    np.testing.assert_array_equal(
        dm.item_counts[item_map["item_idx"].to_numpy()], item_map["count"].to_numpy()
    )


def test_ctr_windows_cover_every_sample_once_and_match_per_sample_logits(prepared):
    from functools import partial

    from recsys_mamba.models.heads import CTRHead
    from recsys_mamba.models.mamba import MambaEncoder
    from recsys_mamba.tasks.ctr import ctr_logits
    from recsys_mamba.training.module import RecLitModule

    dm = _dm(prepared, task="ctr", max_len=6)
    windows = dm.datasets["train"]
    per_sample = windows.samples
    batch = windows.__getitems__(list(range(len(windows))))
    assert sorted(windows.order.tolist()) == list(range(len(per_sample)))
    assert int(batch["sample_hist"].min()) >= 0 and int(batch["sample_hist"].max()) <= 6
    torch.manual_seed(0)
    encoder = MambaEncoder(n_items=30, n_categories=5, n_event_types=1, d_model=8, n_layers=1)
    module = RecLitModule(
        encoder, CTRHead(8, mlp_dims=[8]), optimizer=partial(torch.optim.AdamW), task="ctr"
    ).eval()
    with torch.no_grad():
        grouped = ctr_logits(module, batch)
        single = ctr_logits(module, per_sample.__getitems__(windows.order.tolist()))
    # Samples whose whole history fits in max_len see exactly the same events both ways.
    short = torch.from_numpy(per_sample.hist_len[windows.order] <= 6)
    torch.testing.assert_close(grouped[short], single[short], atol=1e-5, rtol=1e-4)
    assert torch.equal(batch["labels"], torch.from_numpy(per_sample.labels[windows.order]))


def test_length_buckets_cover_every_row_once_with_less_padding(prepared):
    def epoch(dm, e):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(e)
        batches = list(loader)
        slots = sum(b["items"].numel() for b in batches)
        return [b["index"].tolist() for b in batches], slots, len(loader)

    plain = _dm(prepared, max_len=20, seed=3)
    bucketed = _dm(prepared, max_len=20, seed=3, bucket_by_length=True)
    rows, slots, n_batches = epoch(bucketed, 0)
    flat = [i for b in rows for i in b]
    assert sorted(flat) == list(range(len(bucketed.datasets["train"])))
    assert n_batches == len(rows)
    assert all(len(b) <= bucketed.batch_size for b in rows)
    assert slots < epoch(plain, 0)[1]
    # Rows of a batch have neighbouring lengths: each batch spans a contiguous run of the sorted pool.
    lengths = bucketed.datasets["train"].lengths()
    spans = [lengths[b].max() - lengths[b].min() for b in rows]
    assert np.median(spans) <= np.median([lengths[b].max() - lengths[b].min() for b in epoch(plain, 0)[0]])
    assert epoch(bucketed, 0)[0] == rows  # same (seed, epoch), same batches: resumable
    assert epoch(bucketed, 1)[0] != rows


def test_length_buckets_under_ddp_give_each_rank_disjoint_similar_batches(prepared):
    class Trainer:
        world_size = 2

        def __init__(self, rank):
            self.global_rank = rank

    def epoch(rank, e, seed=3, bucket=True):
        dm = _dm(prepared, max_len=20, seed=seed, bucket_by_length=bucket)
        dm.trainer = Trainer(rank)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(e)  # what Lightning calls each epoch
        return [b["index"].tolist() for b in loader], len(loader), dm.datasets["train"]

    (r0, n0, train), (r1, n1, _) = epoch(0, 0), epoch(1, 0)
    assert n0 == n1 == len(r0) == len(r1)  # DDP needs the same number of steps on every rank
    assert [len(b) for b in r0] == [len(b) for b in r1]  # and batches of the same size at each step
    n = len(train)
    seen = [i for b in r0 + r1 for i in b]
    assert sorted(set(seen)) == list(range(n)) and len(seen) == n + n % 2  # padded as DistributedSampler
    for a, b in zip(r0, r1, strict=True):
        assert not set(a) & set(b) or n % 2  # disjoint (bar the one padding row when n is odd)
    # The two ranks' batches at a step come from the same stretch of one sorted pool.
    lengths = train.lengths()

    def spans(x, y):
        return [lengths[a + b].max() - lengths[a + b].min() for a, b in zip(x, y, strict=True)]

    plain = spans(epoch(0, 0, bucket=False)[0], epoch(1, 0, bucket=False)[0])
    assert np.mean(spans(r0, r1)) < np.mean(plain)
    assert epoch(0, 0)[0] == r0 and epoch(0, 1)[0] != r0  # depends only on (seed, epoch)


def test_length_buckets_of_one_rank_are_the_one_process_batches():
    from recsys_mamba.sequences import LengthBucketBatchSampler

    lengths = np.random.default_rng(0).integers(1, 50, 1000)
    one = LengthBucketBatchSampler(lengths, 16, seed=7, pool_batches=4)
    one.set_epoch(2)
    batches = list(one)
    # As before DDP support: DistributedSampler's shuffle, pools of 4 batches sorted by length, batches
    # shuffled by (seed, epoch).
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(9)).numpy()
    expected = []
    for lo in range(0, 1000, 64):
        pool = order[lo : lo + 64][np.argsort(lengths[order[lo : lo + 64]], kind="stable")]
        expected += [pool[i : i + 16].tolist() for i in range(0, len(pool), 16)]
    rng = np.random.default_rng([7, 2])
    assert batches == [expected[i] for i in rng.permutation(len(expected))]
    assert len(one) == len(batches) == 63


@pytest.mark.parametrize("n", [1, 3, 16, 17, 999])
@pytest.mark.parametrize("world", [2, 3])
def test_length_bucket_ranks_are_disjoint_cover_the_rows_and_step_together(n, world):
    from recsys_mamba.sequences import LengthBucketBatchSampler

    lengths = np.random.default_rng(n).integers(1, 200, n)
    ranks = []
    for rank in range(world):
        sampler = LengthBucketBatchSampler(lengths, 8, world, rank, seed=1, pool_batches=4)
        sampler.set_epoch(5)
        ranks.append(list(sampler))
        assert len(sampler) == len(ranks[-1])
    assert len({len(r) for r in ranks}) == 1  # the same number of steps on every rank
    for step in zip(*ranks, strict=True):
        assert len({len(b) for b in step}) == 1  # and batches of one size at each step
    seen = [i for r in ranks for b in r for i in b]
    padding = -n % world  # rows repeated to fill the last step, as DistributedSampler pads
    assert sorted(set(seen)) == list(range(n)) and len(seen) == n + padding
    # every step's batches (all ranks) are one stretch of a length-sorted pool of 4 steps: similar lengths
    spans = [np.ptp(lengths[[i for b in step for i in b]]) for step in zip(*ranks, strict=True)]
    assert n < 100 or np.mean(spans) < 0.5 * np.ptp(lengths)
