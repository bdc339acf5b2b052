"""callbacks=ema: validation, the checkpoints and the test use the averaged weights; the raw ones are
kept beside them for resuming, and both are covered by the checkpoint's digests."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from recsys_mamba.errors import RecsysError
from recsys_mamba.runs.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from recsys_mamba.training.averaging import WeightEMA
from tests.helpers import tiny_cfg


class RecordsTestWeights(BoringModel):
    def test_step(self, batch, batch_idx):
        self.tested = {k: v.detach().clone() for k, v in self.state_dict().items()}
        return super().test_step(batch, batch_idx)


def test_testing_the_best_checkpoint_uses_its_averaged_weights(tmp_path: Path) -> None:
    model = RecordsTestWeights()
    best = ModelCheckpoint(dirpath=tmp_path)  # no monitor: the latest epoch
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=8,
        limit_val_batches=2,
        limit_test_batches=1,
        callbacks=[WeightEMA(decay=0.5, use_buffers=False), best],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    trainer.test(model, ckpt_path=best.best_model_path, weights_only=True, verbose=False)
    saved = torch.load(best.best_model_path, weights_only=True)
    averaged, raw = saved["state_dict"], saved["current_model_state"]
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged)
    for name, tensor in model.tested.items():
        torch.testing.assert_close(tensor, averaged[name], rtol=0, atol=0)


def test_a_training_run_saves_both_weight_sets_under_digests(tmp_path: Path, cache_dir: Path) -> None:
    from recsys_mamba.training.run import train

    out = tmp_path / "run"
    overrides = ["logger=[]", "task=next_item", "model=mamba", "callbacks=ema", "callbacks.ema.decay=0.5"]
    train(tiny_cfg(out, overrides, cache_dir))
    path = out / "checkpoints" / "last.ckpt"
    weights, _ = load_checkpoint(path)
    saved = read_checkpoint(path)
    assert weights.keys() == saved["current_model_state"].keys()
    assert any(not torch.equal(weights[k], saved["current_model_state"][k]) for k in weights)

    # The raw weights are what resuming loads: changing them after saving is refused too.
    name = next(k for k, v in saved["current_model_state"].items() if v.is_floating_point())
    saved["current_model_state"][name] = saved["current_model_state"][name] + 1.0
    doctored = tmp_path / "doctored.ckpt"
    save_checkpoint(saved, doctored)
    with pytest.raises(RecsysError, match="current_model_state"):
        load_checkpoint(doctored)


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_a_decay_outside_0_1_is_refused(decay: float) -> None:
    with pytest.raises(RecsysError, match=r"callbacks\.ema\.decay"):
        WeightEMA(decay=decay)


def test_the_config_check_refuses_a_bad_decay_before_any_work() -> None:
    from recsys_mamba.config import compose
    from recsys_mamba.training.schema import validate_config

    validate_config(compose("train", overrides=["callbacks=ema"]))
    with pytest.raises(RecsysError, match=r"callbacks\.ema\.decay=1\.5 must be"):
        validate_config(compose("train", overrides=["callbacks=ema", "callbacks.ema.decay=1.5"]))
