"""trainer=ddp_cpu: 2 gloo processes through the real command line (Lightning re-launches the script)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recsys_mamba.training.run import train

REPO = Path(__file__).resolve().parents[2]

TINY_CLI = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "model.d_model=16",
    "model.n_layers=1",
    "model.max_len=20",
    "datamodule.batch_size=16",
    "datamodule.eval_batch_size=64",
    "data.synthetic.n_users=160",
    "data.synthetic.n_items=120",
    "data.synthetic.n_categories=6",
    "data.synthetic.mean_events=30",
    "data.synthetic.max_events=80",
]


@pytest.mark.timeout(240)
def test_ddp_cpu_matches_one_process(tiny, tmp_path, cache_dir):
    run_dir = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "recsys_mamba.train",
        "task=ctr",
        "trainer=ddp_cpu",
        *TINY_CLI,
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=220, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((run_dir / "metrics.json").read_text())
    assert ddp["world_size"] == 2 and ddp["epochs"] == 2

    # The DDP-trained weights scored by one process give exactly the DDP test metrics: every sample is
    # gathered from both processes and counted once.
    best = sorted((run_dir / "checkpoints").glob("epoch_*.ckpt"))[-1]
    single_eval = train(
        tiny(
            tmp_path / "eval",
            ["task=ctr", "train=false", f"ckpt_path={best}", "trainer.limit_test_batches=null"],
            cache_dir,
        )
    )
    for key in ("auc", "gauc", "logloss"):
        assert single_eval[key] == pytest.approx(ddp[key], abs=1e-5), key

    # Training in one process reaches the same place up to noise (the global batch differs).
    one = train(
        tiny(
            tmp_path / "one",
            [
                "task=ctr",
                "trainer.max_epochs=2",
                "trainer.limit_train_batches=4",
                "trainer.limit_test_batches=null",
                "datamodule.batch_size=16",
            ],
            cache_dir,
        )
    )
    assert abs(one["auc"] - ddp["auc"]) < 0.15
    assert abs(one["logloss"] - ddp["logloss"]) < 0.1


@pytest.mark.timeout(240)
def test_ddp_cpu_length_buckets_give_each_rank_disjoint_batches(tmp_path):
    """datamodule.bucket_by_length=true under trainer=ddp_cpu: every step, the two ranks train disjoint
    batches of the same size; together they cover every training row each epoch."""
    from recsys_mamba.sequences import PreparedData
    from recsys_mamba.tasks import get_task
    from recsys_mamba.tasks.base import DataSettings

    # Its own cache, so the one prepared folder in it is the one this run trained on.
    run_dir, seen, cache_dir = tmp_path / "ddp", tmp_path / "batches", tmp_path / "cache"
    cmd = [
        sys.executable,
        "-m",
        "recsys_mamba.train",
        "task=next_item",
        "trainer=ddp_cpu",
        *[o for o in TINY_CLI if not o.startswith("trainer.limit_train_batches")],
        "test=false",
        "datamodule.bucket_by_length=true",
        "+callbacks.record._target_=tests.training.ddp_probe.RecordBatches",
        f"+callbacks.record.out={seen}",
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=220, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [
        [json.loads(line) for line in (seen / f"rank-{r}.jsonl").read_text().splitlines()] for r in (0, 1)
    ]
    (prepared,) = (p for p in cache_dir.iterdir() if (p / "store").is_dir())
    settings = DataSettings(max_len=20, positive_targets=True, next_item_windows=True, ctr_train_windows=True)
    train = get_task("next_item").datasets(PreparedData.open(prepared), settings)["train"]
    for epoch in (0, 1):
        r0, r1 = ([b["index"] for b in rows if b["epoch"] == epoch] for rows in ranks)
        assert len(r0) == len(r1) > 1 and [len(b) for b in r0] == [len(b) for b in r1]
        padding = len(train) % 2
        overlap = sum(len(set(a) & set(b)) for a, b in zip(r0, r1, strict=True))
        assert overlap <= padding
        assert sorted({i for b in r0 + r1 for i in b}) == list(range(len(train)))
