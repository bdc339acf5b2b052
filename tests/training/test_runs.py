"""End-to-end runs of the real config, shrunk to a tiny synthetic log and one short epoch."""

import json
import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from recsys_mamba.config import compose, config_dir
from recsys_mamba.errors import RecsysError
from recsys_mamba.tasks import get_task
from recsys_mamba.training.run import RUN_KEYS, build, train

MODELS = sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
SIZES = {"n_items": 50, "n_categories": 4, "n_event_types": 3}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(experiment, tmp_path):
    cfg = compose("train", overrides=[f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
    encoder = instantiate(cfg.model)(**SIZES)
    head = instantiate(cfg.head)
    if not isinstance(head, torch.nn.Module):
        # n_users=null (one embedding per user) is sized from the data, as runs.build_head does.
        users = {"n_users": 7} if head.keywords.get("n_users", 0) is None else {}
        head = head(d_model=encoder.d_model, **users)
    module = instantiate(cfg.module, encoder=encoder, head=head)
    assert isinstance(module, L.LightningModule)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    loggers = [instantiate(c) for c in cfg.logger.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    assert isinstance(trainer, L.Trainer)
    assert cfg.task.monitor.removeprefix("val/") in get_task(cfg.task.name).metric_names
    assert cfg.datamodule.max_len <= cfg.model.max_len


RECIPES = sorted(p.stem for p in (config_dir() / "recipe").glob("*.yaml"))


def _leaves(node, prefix=""):
    """(dotted key, value) of every leaf of a plain nested dict."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_recipe_applies_to_its_own_experiment_and_encoder_only(recipe, tmp_path):
    # A misnamed recipe would be skipped silently (the defaults entry is optional): each file must be
    # <an experiment>_<a model>, change something for that pair, leave every other encoder alone,
    # and give way to the command line.
    pairs = [(e, m) for e in EXPERIMENTS for m in MODELS if recipe == f"{e}_{m}"]
    assert len(pairs) == 1, f"conf/recipe/{recipe}.yaml names no <experiment>_<model> pair"
    experiment, model = pairs[0]
    leaves = dict(_leaves(OmegaConf.to_container(OmegaConf.load(config_dir() / "recipe" / f"{recipe}.yaml"))))
    assert leaves
    base = [f"experiment={experiment}", f"paths.output_dir={tmp_path}"]
    own = compose("train", overrides=[*base, f"model={model}"])
    for other in (m for m in MODELS if m != model):
        cfg = compose("train", overrides=[*base, f"model={other}"])
        for key, value in leaves.items():
            assert OmegaConf.select(own, key) == value, key
            assert OmegaConf.select(cfg, key) != value, f"{key} reaches model={other}"
    key, value = next(iter(leaves.items()))
    changed = compose("train", overrides=[*base, f"model={model}", f"{key}={value * 2}"])
    assert OmegaConf.select(changed, key) == value * 2


@pytest.mark.parametrize("experiment", ["ctr", "next_item"])
@pytest.mark.parametrize("model", MODELS)
def test_model_swaps_in_alone(model, experiment, tmp_path):
    # an experiment's model keys (next_item's ffn) must suit every encoder, not only Mamba and SASRec
    overrides = [f"experiment={experiment}", f"model={model}", f"paths.output_dir={tmp_path}"]
    cfg = compose("train", overrides=overrides)
    assert instantiate(cfg.model)(**SIZES).d_model == cfg.model.d_model


@pytest.mark.parametrize("task", ["next_item", "ctr"])
@pytest.mark.parametrize("model", MODELS)
def test_fast_dev_run(tiny, model, task, tmp_path, cache_dir):
    # model=dnn ignores the sequence: a CTR baseline on user and item embeddings (tested below).
    users = ["head.n_users=null"] if model == "dnn" and task == "ctr" else []
    cfg = tiny(tmp_path, [f"model={model}", f"task={task}", "trainer.fast_dev_run=true", *users], cache_dir)
    if model == "dnn" and task == "next_item":
        with pytest.raises(RecsysError, match="baseline for task=ctr only"):
            train(cfg)
        return
    result = train(cfg)
    for key in get_task(task).metric_names:
        assert math.isfinite(result[key]), key


def test_bf16_mixed_on_cpu(tiny, tmp_path, cache_dir):
    cfg = tiny(tmp_path, ["task=ctr", "trainer.precision=bf16-mixed"], cache_dir)
    result = train(cfg)
    assert result["precision"] == "bf16-mixed"
    assert 0.0 <= result["auc"] <= 1.0 and math.isfinite(result["logloss"])


def test_run_folder_holds_checkpoints_metrics_config_and_logs(tiny, tmp_path, cache_dir):
    out = tmp_path / "run"
    result = train(tiny(out, ["task=next_item", "trainer.max_epochs=2"], cache_dir))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    baselines = {"baseline_popularity_hr@10", "baseline_popularity_ndcg@10"}
    expected = {*get_task("next_item").metric_names, *RUN_KEYS, *baselines}
    assert expected <= set(metrics)
    assert metrics["epochs"] == 2 and metrics["model"] == "mamba"
    ckpts = {p.name for p in (out / "checkpoints").iterdir()}
    assert "last.ckpt" in ckpts and f"epoch_{metrics['best_epoch']:03d}.ckpt" in ckpts
    assert (out / "config.yaml").is_file()
    assert (out / "csv" / "metrics.csv").is_file()
    assert not list(out.glob(".metrics.json.tmp*"))


class _Interrupt(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            trainer.should_stop = True


def test_last_ckpt_holds_the_latest_epoch_and_the_best_checkpoint_is_tested(tiny, tmp_path, cache_dir):
    # mode=min on a metric that rises: the "best" epoch is an early one, so best and last differ.
    overrides = ["trainer.max_epochs=3", "task.mode=min", "callbacks.early_stopping.patience=10"]
    result = train(tiny(tmp_path, overrides, cache_dir))
    folder = tmp_path / "checkpoints"
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2
    best = sorted(folder.glob("epoch_*.ckpt"))
    assert [p.name for p in best] == [f"epoch_{result['best_epoch']:03d}.ckpt"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["last.ckpt", best[0].name])


@pytest.mark.parametrize("task", ["next_item", "ctr"])
def test_resume_matches_uninterrupted_run(tiny, task, tmp_path, cache_dir):
    # Dropout on, several epochs and full (limited) schedule, so any RNG or sampler drift would show.
    common = [
        f"task={task}",
        "trainer.max_epochs=3",
        "model.dropout=0.3",
        "callbacks.early_stopping.patience=10",
    ]
    full = train(tiny(tmp_path / "full", common, cache_dir))
    interrupted = train(tiny(tmp_path / "part", common, cache_dir), extra_callbacks=[_Interrupt()])
    assert interrupted["epochs"] == 1
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    resumed = train(tiny(tmp_path / "resumed", [*common, f"ckpt_path={last}"], cache_dir))
    for key in get_task(task).metric_names:
        assert resumed[key] == pytest.approx(full[key], abs=1e-6), key
    assert resumed["epochs"] == full["epochs"] == 3
    assert resumed["best_epoch"] == full["best_epoch"]


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.max_len=0", "model.max_len"),
        ("datamodule.batch_size=-1", "datamodule.batch_size"),
        ("trainer.precision=16-mixed", "16-mixed needs a GPU"),
        ("trainer.precision=8", "trainer.precision"),
        ("callbacks.early_stopping.monitor=val/auc", "callbacks.early_stopping.monitor"),
        ("ckpt_path=/no/such.ckpt", "ckpt_path"),
        ("task.name=cvr", "task.name"),
    ],
)
def test_bad_config_fails_before_training(tiny, override, match, tmp_path):
    cfg = tiny(tmp_path, [override])
    with pytest.raises(RecsysError, match=match):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_dnn_baseline_needs_the_user_id(tiny, tmp_path):
    cfg = tiny(tmp_path, ["model=dnn", "task=ctr"])
    with pytest.raises(RecsysError, match=r"head\.n_users=null"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_missing_data_file_fails_before_training(tiny, tmp_path):
    cfg = tiny(tmp_path, ["data=ml100k", f"data.path={tmp_path / 'nope.inter'}"], tmp_path / "cache")
    with pytest.raises(RecsysError, match=r"nope\.inter"):
        build(cfg)


def test_popularity_baselines_by_hand(prepared):
    from types import SimpleNamespace

    import numpy as np
    import polars as pl
    from sklearn.metrics import roc_auc_score

    from recsys_mamba.metrics import ranking_metrics
    from recsys_mamba.models.heads import NextItemHead
    from recsys_mamba.training.datamodule import RecDataModule

    def dm(task):
        d = RecDataModule(data={}, task=task, max_len=50, prepared_dir=str(prepared))
        d.setup()
        return d

    def popularity_baseline(d):  # ranked without the history masked, as by a head trained so
        return d.task.baselines(d.prepared, d.datasets, SimpleNamespace(head=NextItemHead()))

    ctr = pl.read_parquet(prepared / "ctr.parquet")
    train_ctr, test_ctr = ctr.filter(pl.col("split") == 0), ctr.filter(pl.col("split") == 2)
    prior = train_ctr["label"].cast(pl.Float64).mean()
    stats = {
        r["item_idx"]: r
        for r in train_ctr.group_by("item_idx").agg(pl.len(), pl.col("label").sum()).to_dicts()
    }
    rate = [
        (stats.get(i, {"label": 0})["label"] + 10 * prior) / (stats.get(i, {"len": 0})["len"] + 10)
        for i in test_ctr["item_idx"]
    ]
    got = popularity_baseline(dm("ctr"))
    assert got["baseline_popularity_auc"] == pytest.approx(roc_auc_score(test_ctr["label"], rate))

    counts = dm("next_item").item_counts
    seqs = pl.read_parquet(prepared / "sequences.parquet")
    ranks = []
    for items, splits in zip(seqs["items"], seqs["splits"], strict=True):
        target = items[list(splits).index(2)]
        ranks.append(int((np.delete(counts, [0, target]) >= counts[target]).sum()) + 1)
    expected = ranking_metrics(np.array(ranks))
    got = popularity_baseline(dm("next_item"))
    assert got["baseline_popularity_hr@10"] == pytest.approx(expected["hr@10"])
    assert got["baseline_popularity_ndcg@10"] == pytest.approx(expected["ndcg@10"])


def test_gradient_checkpointing_trains(tiny, tmp_path, cache_dir):
    result = train(
        tiny(
            tmp_path,
            ["task=next_item", "model.gradient_checkpointing=true", "trainer.max_epochs=1"],
            cache_dir,
        )
    )
    assert math.isfinite(result["ndcg@10"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown on a machine without a GPU")
def test_gpu_trainer_without_gpu_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(RecsysError, match="no CUDA GPU"):
        train(tiny(tmp_path, ["trainer=gpu"]))


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.parametrize("experiment", ["ml1m_next_item", "beauty_next_item", "ml1m_ctr"])
def test_real_data_experiment_runs(experiment, tmp_path):
    from recsys_mamba.config import project_root

    if not (project_root().parent / "shared" / "data").is_dir():
        pytest.skip("../shared/data (the real data sets) is not beside the repository")
    limits = [
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "trainer.enable_progress_bar=false",
    ]
    cfg = compose("train", overrides=[f"experiment={experiment}", f"paths.output_dir={tmp_path}", *limits])
    result = train(cfg)
    # GAUC is undefined (null) when the test split holds one sample per user (leave-one-out).
    assert all(math.isfinite(result[k]) for k in get_task(cfg.task.name).metric_names if k != "gauc")
