"""hparams_search=optuna: the Optuna sweeper over real trainings, as a user starts it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recsys_mamba.config import compose, optuna_direction
from tests.helpers import TINY, TINY_DATA

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install 'recsys-mamba[search]'")


@pytest.mark.parametrize(
    ("metric", "direction"),
    [("val/auc", "maximize"), ("val/logloss", "minimize"), ("logloss", "minimize"), ("ndcg@10", "maximize")],
)
def test_direction_follows_the_optimized_metric(metric, direction):
    assert optuna_direction(metric) == direction


def test_search_config_composes_with_the_task_metric():
    cfg = compose("train", overrides=["hparams_search=optuna", "task=ctr"])
    assert cfg.optimized_metric == "val/auc" and cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.hydra.sweeper.n_trials == 20
    assert "module.optimizer.lr" in cfg.hydra.sweeper.params
    cfg = compose("train", overrides=["hparams_search=optuna", "task=ctr", "optimized_metric=val/logloss"])
    assert cfg.hydra.sweeper.direction == "minimize"


def test_two_trial_search_on_tiny_data(tmp_path, cache_dir):
    logs = tmp_path / "logs"
    cmd = [
        sys.executable,
        "-m",
        "recsys_mamba.train",
        "hparams_search=optuna",  # a multirun without -m
        "task=ctr",
        "hydra.sweeper.n_trials=2",
        f"paths.log_dir={logs}",
        f"paths.cache_dir={cache_dir}",
        *TINY,
        *TINY_DATA,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "setup plugin" not in proc.stdout, "optuna's alembic announces its plugins at INFO: quieted"

    (sweep,) = (logs / "train" / "multiruns").iterdir()
    trials = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in trials] == ["0", "1"]
    values, lrs = [], set()
    for trial in trials:
        metrics = json.loads((trial / "metrics.json").read_text())
        assert metrics["optimized_metric"] == "val/auc"
        values.append(metrics["optimized_value"])
        lrs.add(yaml.safe_load((trial / "config.yaml").read_text())["module"]["optimizer"]["lr"])
    assert len(lrs) == 2, "each trial trains with the learning rate Optuna picked"

    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    assert results["best_value"] == pytest.approx(max(values))  # val/auc: maximised
    assert {"module.optimizer.lr", "model.dropout"} <= set(results["best_params"])
    assert "model.d_model" not in results["best_params"], "a key fixed on the command line is not searched"
