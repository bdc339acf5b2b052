"""NaN/inf guard: a non-finite loss stops training at that very step, naming it and the last good one."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from recsys_mamba.errors import RecsysError
from recsys_mamba.training.module import RecLitModule
from recsys_mamba.training.run import train
from tests.helpers import SMALL_QUIET_RUN

REPO = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 3  # TINY's trainer.limit_train_batches


def inject(
    monkeypatch: pytest.MonkeyPatch, at_step: int, value: float, grads_only: bool = False
) -> list[int]:
    """Make the loss (or, with `grads_only`, just the gradients) non-finite at global step `at_step`."""
    seen: list[int] = []
    original = RecLitModule.training_step

    def step(self: RecLitModule, batch, batch_idx):
        seen.append(self.global_step)
        loss = original(self, batch, batch_idx)
        if self.global_step != at_step:
            return loss
        if grads_only:  # sqrt'(0) is inf, times 0: a finite loss whose gradients are NaN
            return loss + (0.0 * next(self.parameters()).sum()).sqrt()
        return loss * value

    monkeypatch.setattr(RecLitModule, "training_step", step)
    return seen


def checkpoint_named(message: str) -> Path | None:
    found = re.search(r"Last good checkpoint: (\S+\.ckpt)", message)
    return Path(found.group(1)) if found else None


def loads_with_finite_weights(path: Path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_loss_stops_at_that_step(tiny, value, monkeypatch, tmp_path, cache_dir, reliability):
    at_step = STEPS_PER_EPOCH + 1  # epoch 1, batch 1: epoch 0's checkpoints exist
    seen = inject(monkeypatch, at_step, value)
    with pytest.raises(RecsysError) as err:
        train(tiny(tmp_path, ["trainer.max_epochs=3", "callbacks.early_stopping.patience=10"], cache_dir))
    message = str(err.value)
    where = f"epoch 1, global step {at_step}, batch 1"
    ckpt = checkpoint_named(message)
    ok = (
        where in message
        and f"({value})" in message
        and "module.optimizer.lr" in message
        and max(seen) == at_step  # nothing ran after the bad step
        and ckpt is not None
        and ckpt.parent == tmp_path / "checkpoints"
        and loads_with_finite_weights(ckpt)
    )
    reliability.fault("train/nan-loss" if math.isnan(value) else "train/inf-loss", survived=ok)
    assert where in message and f"({value})" in message, message
    assert max(seen) == at_step
    assert ckpt == tmp_path / "checkpoints" / "last.ckpt", message
    assert loads_with_finite_weights(ckpt)
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == STEPS_PER_EPOCH
    assert not (tmp_path / "metrics.json").exists()


def test_nan_before_any_checkpoint_says_none_saved(tiny, monkeypatch, tmp_path, cache_dir, reliability):
    inject(monkeypatch, 0, math.nan)
    with pytest.raises(RecsysError, match=r"epoch 0, global step 0, batch 0.*none saved yet") as err:
        train(tiny(tmp_path, [], cache_dir))
    reliability.fault("train/nan-loss", survived=True)
    assert "trainer.precision=32" in str(err.value)


def test_nan_gradients_are_refused_when_asked(tiny, monkeypatch, tmp_path, cache_dir, reliability):
    at_step = STEPS_PER_EPOCH
    seen = inject(monkeypatch, at_step, 1.0, grads_only=True)
    with pytest.raises(RecsysError, match=r"non-finite gradients in encoder\.\S+.*global step 3") as err:
        train(tiny(tmp_path, ["trainer.max_epochs=2", "callbacks.nan_guard.check_grads=true"], cache_dir))
    ckpt = checkpoint_named(str(err.value))
    ok = max(seen) == at_step and ckpt is not None and loads_with_finite_weights(ckpt)
    reliability.fault("train/nan-grad", survived=ok)
    assert ok, str(err.value)


class PoisonWeights(L.Callback):
    """Loaded into a CLI run (`+callbacks.poison`): sets the weights to NaN before global step `at_step`,
    as corrupted weights or a blown-up update would."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.at_step:
            with torch.no_grad():
                for param in pl_module.parameters():
                    param.fill_(math.nan)


def test_cli_exits_2_naming_the_step_and_checkpoint(tmp_path, reliability):
    at_step = STEPS_PER_EPOCH + 1
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "recsys_mamba.train",
            "+callbacks.poison._target_=tests.training.test_guards.PoisonWeights",
            f"+callbacks.poison.at_step={at_step}",
            "trainer.max_epochs=3",
            f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1",
            *SMALL_QUIET_RUN,
            "data.synthetic.n_users=160",
            "data.synthetic.n_items=120",
            "data.synthetic.mean_events=30",
            "data.synthetic.max_events=80",
            "datamodule.batch_size=32",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    line = next((x for x in proc.stderr.splitlines() if x.startswith("error: ")), "")
    ckpt = checkpoint_named(line)
    ok = (
        proc.returncode == 2
        and f"(nan) at epoch 1, global step {at_step}, batch 1." in line
        and "Traceback" not in proc.stderr
        and ckpt == tmp_path / "run" / "checkpoints" / "last.ckpt"
        and loads_with_finite_weights(ckpt)
    )
    reliability.fault("train/nan-loss", survived=ok)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert line.startswith(
        f"error: non-finite training loss (nan) at epoch 1, global step {at_step}, batch 1."
    ), line
    assert ckpt == tmp_path / "run" / "checkpoints" / "last.ckpt" and loads_with_finite_weights(ckpt)
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()
