"""`bench accuracy` and `bench state`: tables from run folders, and a miniature of every benchmark sweep.

The miniatures run the real `bench_*` experiments with -m on tiny synthetic data for one short epoch,
then tabulate them, so the commands in BENCHMARKS.md keep working; the numbers mean nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recsys_mamba.bench import accuracy, state
from recsys_mamba.errors import RecsysError
from tests.helpers import SMALL_QUIET_RUN

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "data=synthetic",
    "data.synthetic.n_users=120",
    "data.synthetic.n_items=80",
    "data.synthetic.mean_events=20",
    "data.synthetic.max_events=60",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    *SMALL_QUIET_RUN,
    "datamodule.batch_size=32",
    "logger=csv",
]


def _fake_run(
    folder: Path, model: str, seed: int, ndcg: float, d_state: int = 16, data: str = "ml1m"
) -> None:
    folder.mkdir(parents=True)
    metrics = {
        "data": data,
        "task": "next_item",
        "model": model,
        "epochs": 3,
        "best_epoch": 2,
        "train_time_s": 30.0,
        "epoch_time_s": 10.0,
        "n_params": 100,
    }
    for protocol, bump in (("unmasked", 0.0), ("masked", 0.01)):
        metrics |= {
            f"{protocol}_ndcg@10": ndcg + bump,
            f"{protocol}_hr@10": 2 * ndcg + bump,
            f"{protocol}_mrr@10": ndcg / 2 + bump,
        }
    metrics |= {
        "ndcg@10": ndcg,
        "hr@10": 2 * ndcg,
        "mrr@10": ndcg / 2,
        "baseline_popularity_ndcg@10": 0.05,
        "baseline_popularity_hr@10": 0.1,
        "baseline_popularity_mrr@10": 0.03,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    config = {
        "seed": seed,
        "model": {"_target_": model, "d_state": d_state},
        "head": {"mask_history": False},
        "paths": {"output_dir": str(folder)},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))


def test_groups_differ_only_in_seed_and_get_mean_and_std(tmp_path):
    for i, (seed, nd) in enumerate([(1, 0.20), (2, 0.22), (3, 0.24)]):
        _fake_run(tmp_path / f"m{i}", "mamba", seed, nd)
        _fake_run(tmp_path / f"s{i}", "sasrec", seed, nd - 0.02)
    result = accuracy.tabulate([str(tmp_path)])
    rows = {r["label"]: r for r in result["groups"]}
    assert set(rows) == {"mamba", "sasrec"}
    mamba = rows["mamba"]["metrics"]["unmasked_ndcg@10"]
    assert mamba["n"] == 3 and mamba["mean"] == pytest.approx(0.22) and mamba["std"] == pytest.approx(0.02)
    assert rows["mamba"]["seeds"] == [1, 2, 3]
    goals = result["goals"]
    assert goals["ml1m: mamba unmasked NDCG@10 >= 0.2"]["met"] is True
    assert goals["ml1m: mamba unmasked NDCG@10 >= sasrec"]["met"] is True
    table = accuracy.markdown(result["groups"], goals)
    assert "0.2200 ± 0.0200" in table and "Mamba4Rec (paper)" in table


def test_settings_that_vary_name_the_groups(tmp_path):
    for d, nd in ((8, 0.19), (16, 0.2)):
        _fake_run(tmp_path / f"d{d}", "mamba", 1, nd, d_state=d)
    labels = {r["label"] for r in accuracy.tabulate([str(tmp_path)])["groups"]}
    assert labels == {"mamba d_state=8", "mamba d_state=16"}


def test_runs_trained_on_the_validation_targets_are_labelled_and_kept_out_of_the_goals(tmp_path):
    for name, ndcg, on_valid in (("held_out", 0.19, False), ("on_valid", 0.25, True)):
        _fake_run(tmp_path / name, "mamba", 1, ndcg)
        config = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        config["datamodule"] = {"train_on_valid": on_valid}
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(config))
    result = accuracy.tabulate([str(tmp_path)])
    labels = {g["label"] for g in result["groups"]}
    assert labels == {"mamba train_on_valid=False", "mamba train_on_valid=True"}
    assert result["goals"]["ml1m: mamba unmasked NDCG@10 >= 0.2"]["met"] is False  # 0.19, not 0.25
    alone = accuracy.tabulate([str(tmp_path / "on_valid")])
    assert [g["label"] for g in alone["groups"]] == ["mamba train_on_valid=True"]
    assert alone["goals"] == {}


def test_checkpoint_file_settings_do_not_split_a_group(tmp_path):
    # Runs from before and after conf/callbacks/last_checkpoint.yaml existed are the same experiment.
    _fake_run(tmp_path / "old", "mamba", 1, 0.2)
    _fake_run(tmp_path / "new", "mamba", 2, 0.22)
    config = yaml.safe_load((tmp_path / "new" / "config.yaml").read_text())
    config["callbacks"] = {
        "model_checkpoint": {"save_last": False},
        "last_checkpoint": {"filename": "last", "monitor": None},
    }
    (tmp_path / "new" / "config.yaml").write_text(yaml.safe_dump(config))
    groups = accuracy.tabulate([str(tmp_path)])["groups"]
    assert [(g["label"], g["seeds"]) for g in groups] == [("mamba", [1, 2])]


def test_missing_or_broken_runs_are_clear_errors(tmp_path):
    with pytest.raises(RecsysError, match="not a folder"):
        accuracy.tabulate([str(tmp_path / "nope")])
    with pytest.raises(RecsysError, match=r"no metrics\.json"):
        accuracy.tabulate([str(tmp_path)])
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.json").write_text("{truncated")
    with pytest.raises(RecsysError, match="not readable JSON"):
        accuracy.tabulate([str(tmp_path)])


def test_halvings_and_claim_verdict():
    speed = {d: {"tokens_per_s": 1000.0 * 32 / d} for d in (8, 16, 32)}  # halving doubles the speed
    acc = {8: {"value": 0.18}, 16: {"value": 0.2}, 32: {"value": 0.2}}
    rows = state.halvings(speed, acc)
    assert [(r["from"], r["to"]) for r in rows] == [(16, 8), (32, 16)]
    assert rows[0]["speedup"] == pytest.approx(1.0) and rows[0]["accuracy_loss"] == pytest.approx(0.1)
    assert state.verdict(rows)["verdict"].startswith("refuted")
    near = {d: {"tokens_per_s": 1000.0 * 1.4 ** (-d.bit_length())} for d in (8, 16)}
    assert state.verdict(state.halvings(near, {8: {"value": 0.196}, 16: {"value": 0.2}}))[
        "verdict"
    ].startswith("confirmed")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize(
    ("experiment", "sweep", "task"),
    [
        ("bench_ml1m_next_item", ["seed=1"], "next_item"),
        # Same code paths as the two rows beside them, other configs: slow, to keep the default run short.
        pytest.param("bench_beauty_next_item", ["seed=1"], "next_item", marks=pytest.mark.slow),
        pytest.param("bench_beauty_train_on_valid", ["seed=1"], "next_item", marks=pytest.mark.slow),
        # The synthetic stand-in has event types of its own: the MovieLens rating events are off.
        pytest.param(
            "bench_ml100k_ctr", ["seed=1", "data.rating_events=false"], "ctr", marks=pytest.mark.slow
        ),
        ("bench_ml1m_ctr", ["seed=1", "data.rating_events=false"], "ctr"),
    ],
)
def test_accuracy_sweep_miniature(tmp_path, experiment, sweep, task):
    sweep_dir = tmp_path / "sweep"
    _cli(
        "recsys_mamba.train",
        "-m",
        f"experiment={experiment}",
        *TINY,
        *sweep,
        f"hydra.sweep.dir={sweep_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )
    out = tmp_path / "acc.json"
    _cli("recsys_mamba.bench", "accuracy", f"runs=[{sweep_dir}]", f"output_json={out}", cwd=tmp_path)
    result = json.loads(out.read_text())
    assert sorted(r["model"] for r in result["groups"]) == ["mamba", "sasrec"]
    assert {r["task"] for r in result["groups"]} == {task}
    assert out.with_suffix(".md").is_file()


def test_state_sweep_miniature(tmp_path):
    sweep_dir = tmp_path / "sweep"
    _cli(
        "recsys_mamba.train",
        "-m",
        "experiment=bench_ml1m_state",
        *TINY,
        "model.d_state=4,8",
        f"hydra.sweep.dir={sweep_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )
    out = tmp_path / "state.json"
    _cli(
        "recsys_mamba.bench",
        "state",
        f"runs=[{sweep_dir}]",
        "d_states=[4,8]",
        "batch_size=4",
        "length=16",
        "repeats=1",
        "model.d_model=16",
        "model.n_layers=1",
        f"output_json={out}",
        cwd=tmp_path,
    )
    result = json.loads(out.read_text())
    assert set(result["speed"]) == {"4", "8"} and set(result["accuracy"]) == {"4", "8"}
    assert [(r["from"], r["to"]) for r in result["halvings"]] == [(8, 4)]
    assert out.with_suffix(".png").stat().st_size > 0
