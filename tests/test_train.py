"""The `python -m recsys_mamba.train` command line: a tiny run end to end, and clear errors up front."""

import json
import subprocess
import sys

import pytest

from recsys_mamba.tasks import get_task
from recsys_mamba.training.run import RUN_KEYS
from tests.helpers import SMALL_QUIET_RUN

TINY = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    *SMALL_QUIET_RUN,
    "data.synthetic.n_users=100",
    "data.synthetic.n_items=80",
    "data.synthetic.mean_events=25",
]


def _run(args, tmp_path, timeout=180):
    cmd = [
        sys.executable,
        "-m",
        "recsys_mamba.train",
        *args,
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_cli_experiment_runs_and_writes_outputs(tmp_path):
    proc = _run(["experiment=ctr", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {*get_task("ctr").metric_names, *RUN_KEYS, "baseline_popularity_auc"} <= set(metrics)
    assert metrics["model"] == "mamba"
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert "popularity" in proc.stdout and "auc" in proc.stdout  # the final table


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model=nosuchmodel"], "Could not find 'model/nosuchmodel'"),
        (["experiment=nosuch"], "Could not find 'experiment/nosuch'"),
        (["model.max_len=0"], "model.max_len"),
        (["data=ml100k", "data.path=/nonexistent/u.data"], "/nonexistent/u.data"),
    ],
)
def test_cli_errors_are_clear_and_early(args, expected, tmp_path):
    proc = _run(args, tmp_path, timeout=90)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_early_stop_is_reported_after_testing_the_best_checkpoint(tmp_path):
    # lr ~ 0: the validation AUC never improves, so patience 1 stops the run after its second epoch.
    # Testing the best checkpoint restores the callbacks' state from epoch 0; the flag must survive it.
    args = [*TINY, "trainer.max_epochs=5", "callbacks.early_stopping.patience=1", "module.optimizer.lr=1e-12"]
    proc = _run(["experiment=ctr", *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["stopped_early"] is True and metrics["epochs"] == 2
