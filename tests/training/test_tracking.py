"""Experiment trackers: one tiny epoch of the real config per logger, read back from what landed on disk."""

import importlib.util
import math

import pytest

from recsys_mamba.errors import RecsysError
from recsys_mamba.training.run import train

TEST_KEYS = ("test/auc", "test/logloss")  # what the ctr task logs when it tests the best checkpoint


def _run(tiny, tmp_path, cache_dir, logger: str, *extra: str) -> tuple[dict, object]:
    out = tmp_path / "run"
    overrides = [f"logger={logger}", "task=ctr", "name=tiny-ctr", f"paths.log_dir={tmp_path / 'logs'}"]
    return train(tiny(out, overrides + list(extra), cache_dir)), out


def test_mlflow_local_file_store(tiny, tmp_path, cache_dir, monkeypatch):
    pytest.importorskip("mlflow", reason="pip install 'recsys-mamba[tracking]'")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # train allows the file: store itself
    result, _ = _run(tiny, tmp_path, cache_dir, "mlflow")
    store = tmp_path / "logs" / "mlflow" / "mlruns"
    assert store.is_dir(), "the default tracking_uri is a local folder beside the run folders"

    client = MlflowClient(tracking_uri=f"file:{store}")
    experiment = client.get_experiment_by_name("synthetic-ctr")  # ${data.name}-${task.name}
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny-ctr" and run.info.status == "FINISHED"
    params, metrics = run.data.params, run.data.metrics
    assert params["task.name"] == "ctr" and params["seed"] == "42" and params["choice/model"] == "mamba"
    assert params["module.optimizer.lr"] == "0.001"
    assert not any(k.startswith("hydra") for k in params)
    for key in TEST_KEYS:
        assert metrics[key] == pytest.approx(result[key.removeprefix("test/")])
    assert "val/auc" in metrics and "train/loss_step" in metrics
    assert metrics["baseline/popularity_auc"] == pytest.approx(result["baseline_popularity_auc"])
    history = client.get_metric_history(run.info.run_id, "train/loss_step")
    assert len(history) == 3 and all(math.isfinite(m.value) for m in history)  # limit_train_batches=3


def test_tensorboard_event_files(tiny, tmp_path, cache_dir):
    pytest.importorskip("tensorboard", reason="pip install 'recsys-mamba[tracking]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, out = _run(tiny, tmp_path, cache_dir, "tensorboard")
    folder = out / "tensorboard"
    assert list(folder.glob("events.out.tfevents.*")), "event files go straight into <run>/tensorboard"
    events = EventAccumulator(str(folder)).Reload()  # every event file of the folder
    scalars = set(events.Tags()["scalars"])
    assert {"val/auc", "train/loss_step", "baseline/popularity_auc", *TEST_KEYS} <= scalars
    for key in TEST_KEYS:
        (point,) = events.Scalars(key)
        assert point.value == pytest.approx(result[key.removeprefix("test/")], rel=1e-5)
    # The hyper-parameters: hparams.yaml beside the events (what TensorBoard's HPARAMS tab shows).
    hparams = (folder / "hparams.yaml").read_text()
    assert "task.name: ctr" in hparams and "choice/model: mamba" in hparams


def test_wandb_config_is_offline_and_inside_the_run_folder(tiny, tmp_path):
    cfg = tiny(tmp_path / "run", ["logger=wandb", "name=tiny"])
    wandb = cfg.logger.wandb
    assert wandb._target_ == "lightning.pytorch.loggers.wandb.WandbLogger"
    assert wandb.offline is True, "no account or network needed by default"
    assert wandb.save_dir == str(tmp_path / "run") and wandb.name == "tiny"
    assert wandb.group == "synthetic-next_item"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_missing_says_what_to_install(tiny, tmp_path):
    with pytest.raises(RecsysError, match="needs the wandb package: pip install wandb, or choose logger=csv"):
        train(tiny(tmp_path / "run", ["logger=wandb"]))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (optional)")
def test_wandb_offline_run(tiny, tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    _, out = _run(tiny, tmp_path, cache_dir, "wandb")
    assert list((out / "wandb").glob("offline-run-*")), "an offline run folder, to upload with wandb sync"


@pytest.mark.parametrize(("logger", "package"), [("tensorboard", "tensorboard"), ("mlflow", "mlflow-skinny")])
def test_missing_tracker_package_names_the_extra(tiny, tmp_path, monkeypatch, logger, package):
    from recsys_mamba.training import schema

    real = importlib.util.find_spec
    hidden = {"tensorboard", "tensorboardX", "mlflow"}
    monkeypatch.setattr(
        schema.importlib.util, "find_spec", lambda m, *a: None if m in hidden else real(m, *a)
    )
    message = f"needs the {package} package: pip install 'recsys-mamba\\[tracking\\]'"
    with pytest.raises(RecsysError, match=message):
        schema.validate_config(tiny(tmp_path / "run", [f"logger={logger}"]))


def test_many_loggers_compose(tiny, tmp_path):
    cfg = tiny(tmp_path / "run", ["logger=many_loggers"])
    assert set(cfg.logger) == {"csv", "tensorboard", "mlflow"}


@pytest.mark.parametrize(("model", "recipe"), [("mamba", "next_item_mamba"), ("sasrec", None)])
def test_tracked_choices_name_only_a_recipe_that_exists(model, recipe, tmp_path):
    from recsys_mamba.config import compose
    from recsys_mamba.training.run import tracking_params

    overrides = ["experiment=next_item", f"model={model}", f"paths.output_dir={tmp_path}"]
    params = tracking_params(compose("train", overrides=overrides, return_hydra_config=True))
    assert params["choice/experiment"] == "next_item" and params["choice/model"] == model
    assert params.get("choice/recipe") == recipe  # next_item_sasrec.yaml does not exist: nothing applied
    # MLflow refuses parameter names outside [A-Za-z0-9_-. :/]
    assert all(
        set(key) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-. :/")
        for key in params
    )
