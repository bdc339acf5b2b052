"""Checkpoint safety: pickled payloads never run, damaged or foreign checkpoints and doctored run configs are
refused with a clear error, and a save that fails or dies half-way leaves the previous checkpoint usable."""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from recsys_mamba import files as ckpt_mod  # where checkpoints are written: tests patch its open and os
from recsys_mamba.config import compose, config_dir
from recsys_mamba.errors import RecsysError
from recsys_mamba.runs.checkpoint import FORMAT_VERSION, METADATA_KEY, check_targets, load_checkpoint
from recsys_mamba.training.checkpoint_io import AtomicCheckpointIO
from tests.helpers import tiny_cfg

TRAIN = ["logger=[]", "task=next_item", "model=mamba"]


class Payload:
    """Unpickling this creates `marker`: the stand-in for the code a tampered checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A tiny trained next-item run folder: config.yaml and checkpoints/last.ckpt."""
    from recsys_mamba.training.run import train

    out = tmp_path_factory.mktemp("ckpt_run")
    train(tiny_cfg(out, TRAIN, cache_dir))
    return out


def doctored(run: Path, folder: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the run folder whose checkpoint went through `edit` (then saved with plain torch.save)."""
    (folder / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "config.yaml", folder / "config.yaml")
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    edit(saved)
    path = folder / "checkpoints" / "doctored.ckpt"
    torch.save(saved, path)
    return path


def with_meta(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def edit(saved: dict[str, Any]) -> None:
        saved[METADATA_KEY] = json.dumps({**json.loads(saved[METADATA_KEY]), **changes})

    return edit


def copied(run: Path, folder: Path, data: bytes) -> Path:
    """A copy of the run folder whose checkpoint file holds `data`."""
    (folder / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "config.yaml", folder / "config.yaml")
    path = folder / "checkpoints" / "x.ckpt"
    path.write_bytes(data)
    return path


def resume(ckpt: Path, out: Path, cache_dir: Path, *overrides: str) -> None:
    from recsys_mamba.training.run import train

    train(tiny_cfg(out, [*TRAIN, "trainer.max_epochs=2", f"ckpt_path={ckpt}", *overrides], cache_dir))


def evaluate_score(ckpt: Path) -> None:
    from recsys_mamba.evaluation.scoring import score

    score(ckpt)


def scoring_load(ckpt: Path) -> None:
    from recsys_mamba.runs import load_run

    load_run(ckpt)


def scoring_with_data(ckpt: Path) -> None:
    """load_run with the prepared folder the run trained on given as prepared=."""
    from recsys_mamba.runs import load_run
    from recsys_mamba.runs.load import prepared_folder, run_config

    load_run(ckpt, prepared=prepared_folder(run_config(ckpt)))


# ---- what a checkpoint holds ----------------------------------------------------------------------


def test_checkpoints_load_weights_only_and_carry_json_metadata(run: Path) -> None:
    for path in (run / "checkpoints").glob("*.ckpt"):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        assert "optimizer" not in saved["hyper_parameters"] and isinstance(saved[METADATA_KEY], str)
        state, meta = load_checkpoint(path)
        assert state.keys() == saved["state_dict"].keys()
        assert meta["format_version"] == FORMAT_VERSION
        assert meta["task"] == "next_item" and meta["n_items"] == 120
        assert meta["model_target"] == "recsys_mamba.models.mamba.MambaEncoder"
        assert meta["data_config_hash"] and meta["config"]["model"]["d_model"] == 16
        assert meta["config"]["paths"]["cache_dir"] != "${paths.cache_dir}"  # resolved where possible


# ---- tampered checkpoints ---------------------------------------------------------------------------


def test_pickled_payload_is_refused_and_never_runs(run, tmp_path, cache_dir, reliability) -> None:
    marker = tmp_path / "payload_ran"
    ckpt = doctored(run, tmp_path / "evil", lambda saved: saved.update(extra=Payload(marker)))
    paths = {
        "loader": lambda: load_checkpoint(ckpt),
        "evaluate": lambda: evaluate_score(ckpt),
        "score": lambda: scoring_load(ckpt),
        "train-resume": lambda: resume(ckpt, tmp_path / "resumed", cache_dir),
        "train-test-only": lambda: resume(ckpt, tmp_path / "tested", cache_dir, "train=false"),
    }
    for name, attempt in paths.items():
        with pytest.raises(RecsysError, match=r"pickled Python objects .*NOT loaded") as err:
            attempt()
        assert str(ckpt) in str(err.value), name
        assert not marker.exists(), f"the payload ran via {name}"
        reliability.fault("checkpoint/pickled-payload", survived=True)
    # The payload is live: an unsafe load would have run it.
    torch.load(ckpt, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_pickled_payload_through_the_cli_exits_2_without_running(run, tmp_path, reliability) -> None:
    marker = tmp_path / "payload_ran"
    ckpt = doctored(run, tmp_path / "evil", lambda saved: saved.update(extra=Payload(marker)))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "recsys_mamba.evaluate",
            f"ckpt_path={ckpt}",
            f"out_dir={tmp_path / 'out'}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: " in proc.stderr and "pickled Python objects" in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()
    reliability.fault("checkpoint/pickled-payload", survived=True)


def test_checkpoint_of_an_older_version_says_so(run, tmp_path, reliability) -> None:
    def old(saved: dict[str, Any]) -> None:  # what train wrote before: pickled optimizer partials
        saved["hyper_parameters"]["optimizer"] = functools.partial(torch.optim.AdamW, lr=1e-3)
        del saved[METADATA_KEY]

    with pytest.raises(RecsysError, match=r"older recsys-mamba version.*retrain"):
        load_checkpoint(doctored(run, tmp_path / "old", old))
    with pytest.raises(RecsysError, match="no checkpoint format version"):
        load_checkpoint(doctored(run, tmp_path / "nometa", lambda saved: saved.pop(METADATA_KEY)))
    reliability.fault("checkpoint/older-version", survived=True)


def test_changed_weights_are_refused(run, tmp_path, reliability) -> None:
    def tamper(saved: dict[str, Any]) -> None:
        name = next(iter(saved["state_dict"]))
        saved["state_dict"][name] = saved["state_dict"][name] + 1

    with pytest.raises(RecsysError, match="do not match the digest"):
        load_checkpoint(doctored(run, tmp_path / "w", tamper))
    with pytest.raises(RecsysError, match="not a JSON object"):
        load_checkpoint(doctored(run, tmp_path / "j", lambda saved: saved.update({METADATA_KEY: "{oops"})))
    reliability.fault("checkpoint/tampered-weights", survived=True)


# ---- damaged files ----------------------------------------------------------------------------------


def test_truncated_checkpoints_are_refused(run, tmp_path, cache_dir, reliability) -> None:
    data = (run / "checkpoints" / "last.ckpt").read_bytes()
    for size in (0, 1, 64, len(data) // 4, len(data) // 2, len(data) - 100, len(data) - 1):
        ckpt = copied(run, tmp_path / f"cut{size}", data[:size])
        with pytest.raises(RecsysError, match=r"truncated or corrupted .*NOT loaded"):
            load_checkpoint(ckpt)
        reliability.fault("checkpoint/truncated", survived=True)
    with pytest.raises(RecsysError, match="truncated or corrupted"):
        evaluate_score(ckpt)
    with pytest.raises(RecsysError, match="truncated or corrupted"):
        resume(ckpt, tmp_path / "resumed", cache_dir)
    reliability.fault("checkpoint/truncated", survived=True, data_lost=False)


def test_random_bytes_are_refused(run, tmp_path, reliability) -> None:
    rng = np.random.default_rng(0)
    for i, data in enumerate([rng.bytes(4096), b"PK\x03\x04" + rng.bytes(4096), b"\x80\x02" + rng.bytes(64)]):
        with pytest.raises(RecsysError, match=r"truncated or corrupted .*NOT loaded"):
            load_checkpoint(copied(run, tmp_path / str(i), data))
        reliability.fault("checkpoint/random-bytes", survived=True)
    with pytest.raises(RecsysError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")


# ---- checkpoints of something else ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["data.synthetic.n_items=77"], "n_items=120 but is being loaded for n_items=77"),
        (["task=ctr"], "task='next_item' but is being loaded for task='ctr'"),
        (["model=sasrec"], "model_target='recsys_mamba.models.mamba.MambaEncoder'"),
    ],
)
def test_resume_from_another_runs_checkpoint_is_refused(
    run, overrides, field, tmp_path, cache_dir, reliability
) -> None:
    shutil.copytree(run, tmp_path / "run")  # a resumed run checkpoints into its checkpoint's folder
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(RecsysError, match=field) as err:
        resume(ckpt, tmp_path / "out", cache_dir, *overrides)
    assert str(ckpt) in str(err.value)
    reliability.fault("checkpoint/other-run", survived=True)


def test_evaluating_a_checkpoint_of_another_model_or_data_is_refused(run, tmp_path, reliability) -> None:
    cases = {
        "model": (with_meta(model_target="recsys_mamba.models.sasrec.SASRecEncoder"), "model=..."),
        "data": (with_meta(data_config_hash="0123456789ab"), "prepared=<the folder it was trained on>"),
    }
    for name, (edit, fix) in cases.items():
        ckpt = doctored(run, tmp_path / name, edit)
        # A checkpoint scores with the item table it carries; checked against data where data is used.
        attempts = (evaluate_score, scoring_load) if name == "model" else (evaluate_score, scoring_with_data)
        for attempt in attempts:
            with pytest.raises(RecsysError, match=fix.replace(".", r"\.").replace("<", ".")):
                attempt(ckpt)
            reliability.fault("checkpoint/other-run", survived=True)


def test_checkpoint_format_versions(run, tmp_path, reliability) -> None:
    newer = doctored(
        run, tmp_path / "new", with_meta(format_version=FORMAT_VERSION + 1, package_version="9.0")
    )
    with pytest.raises(
        RecsysError, match=f"format {FORMAT_VERSION + 1}, written by recsys-mamba 9.0.*upgrade"
    ):
        load_checkpoint(newer)
    for bad in ("1", 0, None, True):
        with pytest.raises(RecsysError, match="unknown checkpoint format version"):
            load_checkpoint(doctored(run, tmp_path / f"v{bad}", with_meta(format_version=bad)))
    reliability.fault("checkpoint/format-version", survived=True)


# ---- run configs --------------------------------------------------------------------------------------


def test_every_shipped_config_passes_the_target_check() -> None:
    files = sorted(config_dir().rglob("*.yaml"))
    assert len(files) > 20
    for file in files:
        cfg = OmegaConf.load(file)
        if "hydra" in cfg:  # hparams_search's sweeper: train saves config.yaml without `hydra:`
            del cfg["hydra"]
        check_targets(cfg, file)
    options = {
        "model": ["mamba", "sasrec", "gru4rec"],
        "trainer": ["cpu", "gpu", "ddp", "ddp_cpu"],
        "logger": ["csv", "tensorboard", "mlflow", "wandb", "many_loggers"],
        "experiment": ["ctr", "next_item"],
    }
    for group, names in options.items():
        for name in names:
            cfg = compose("train", overrides=[f"{group}={name}"], return_hydra_config=False)
            check_targets(cfg, f"train {group}={name}")
    for name in ("evaluate", "score"):
        check_targets(compose(name, return_hydra_config=False), name)


@pytest.mark.parametrize(
    "target",
    [
        "os.system",
        "builtins.open",
        "subprocess.run",
        "torch.load",
        "recsys_mamba.training.run.os.system",  # an allowed package's import of something else
        "recsys_mamba.training.run.instantiate",
        "recsys_mamba.no_such_thing",
        "${oc.env:HOME}",
    ],
)
def test_doctored_config_targets_are_refused(run, target, tmp_path, reliability) -> None:
    from recsys_mamba.runs import run_config

    marker = tmp_path / "config_ran"
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    cfg = OmegaConf.load(folder / "config.yaml")
    cfg.model = {"_target_": target, "file": str(marker), "mode": "w"}
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    ckpt = folder / "checkpoints" / "last.ckpt"
    for attempt in (run_config, evaluate_score, scoring_load):
        with pytest.raises(RecsysError, match=r"model\._target_=.* is not allowed"):
            attempt(ckpt)
    assert not marker.exists()
    reliability.fault("config/doctored-target", survived=True)


def test_targets_in_lists_and_nested_nodes_are_checked() -> None:
    cfg = {"logger": [{"_target_": "lightning.pytorch.loggers.CSVLogger"}, {"_target_": "os.system"}]}
    with pytest.raises(RecsysError, match=r"logger\.1\._target_='os.system'"):
        check_targets(cfg, "x.yaml")
    with pytest.raises(RecsysError, match=r"model\._target_='os.system'"):  # a node made by a resolver
        check_targets(OmegaConf.create({"model": "${oc.create:{_target_: os.system}}"}), "x.yaml")
    check_targets({"trainer": {"_target_": "lightning.pytorch.Trainer"}, "a": {"b": {"c": 1}}}, "x.yaml")


# ---- atomic writes ------------------------------------------------------------------------------------


def small_checkpoint(value: float) -> dict[str, Any]:
    return {"state_dict": {"w": torch.full((1000,), value)}, "epoch": int(value)}


def fake_open(fail: BaseException, after_half: bool) -> Callable[..., Any]:
    """An `open` whose file writes half of what it is given (or nothing) and then raises `fail`."""
    real_open = open

    class Dying:
        def __init__(self, path: Path, mode: str) -> None:
            self.file = real_open(path, mode)

        def write(self, data: Any) -> int:
            if after_half:
                self.file.write(bytes(data)[: len(data) // 2])
                self.file.flush()
            raise fail

        def __enter__(self) -> Dying:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

        def __getattr__(self, name: str) -> Any:
            return getattr(self.file, name)

    return Dying


class Crash(BaseException):
    """The process dying mid-write (as far as this code can tell, like SIGKILL without the kill)."""


@pytest.mark.parametrize(
    ("fail", "after_half", "kind"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), True, "checkpoint/disk-full"),
        (OSError(errno.EIO, "Input/output error"), True, "checkpoint/io-error"),
        (PermissionError(errno.EACCES, "Permission denied"), False, "checkpoint/unwritable"),
        (Crash(), True, "checkpoint/crash-mid-save"),
    ],
)
def test_a_failed_save_leaves_the_previous_checkpoint(
    fail, after_half, kind, tmp_path, monkeypatch, reliability
) -> None:
    io = AtomicCheckpointIO(metadata={"format_version": FORMAT_VERSION, "task": "next_item"})
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(small_checkpoint(1.0), path)
    monkeypatch.setattr(ckpt_mod, "open", fake_open(fail, after_half), raising=False)
    if isinstance(fail, OSError):
        expected = re.escape(f"cannot write {path} ({fail.strerror}")
        with pytest.raises(RecsysError, match=expected) as err:
            io.save_checkpoint(small_checkpoint(2.0), path)
        assert errno.errorcode[fail.errno] in str(err.value) and "previous checkpoint" in str(err.value)
    else:
        with pytest.raises(Crash):
            io.save_checkpoint(small_checkpoint(2.0), path)
    monkeypatch.undo()
    state, _ = load_checkpoint(path)
    assert torch.equal(state["w"], torch.full((1000,), 1.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left
    reliability.fault(kind, survived=True)


def test_a_failing_fsync_is_an_error_too(tmp_path, monkeypatch, reliability) -> None:
    io = AtomicCheckpointIO(metadata={"format_version": FORMAT_VERSION})
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(small_checkpoint(1.0), path)

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.os, "fsync", fsync)
    with pytest.raises(RecsysError, match="ENOSPC"):
        io.save_checkpoint(small_checkpoint(2.0), path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)[0]["w"], torch.full((1000,), 1.0))
    reliability.fault("checkpoint/disk-full", survived=True)


def test_disk_full_while_training_keeps_the_last_good_checkpoint(
    tmp_path, cache_dir, monkeypatch, reliability
) -> None:
    from recsys_mamba.training.run import train

    dying = fake_open(OSError(errno.ENOSPC, "No space left on device"), after_half=True)
    opened: list[Path] = []

    def disk_fills_after_epoch_0(path: Path, mode: str) -> Any:
        opened.append(path)  # epoch 0 writes epoch_000.ckpt and last.ckpt; then the disk is full
        return open(path, mode) if len(opened) <= 2 else dying(path, mode)

    monkeypatch.setattr(ckpt_mod, "open", disk_fills_after_epoch_0, raising=False)
    with pytest.raises(RecsysError, match="No space left on device"):
        train(tiny_cfg(tmp_path / "run", [*TRAIN, "trainer.max_epochs=2"], cache_dir))
    monkeypatch.undo()
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0
    resumed = train(
        tiny_cfg(tmp_path / "resumed", [*TRAIN, "trainer.max_epochs=2", f"ckpt_path={last}"], cache_dir)
    )
    assert resumed["epochs"] == 2
    reliability.fault("checkpoint/disk-full", survived=True)


KILLED_WRITER = """
import sys, time, torch
from recsys_mamba import files
from recsys_mamba.training.checkpoint_io import AtomicCheckpointIO
from recsys_mamba.runs.checkpoint import FORMAT_VERSION
real_open = open

class Slow:  # writes in 64 KiB pieces, announcing each, so the parent can kill it mid-write
    def __init__(self, *args):
        self.file = real_open(*args)
    def write(self, data):
        data = bytes(data)
        for start in range(0, len(data), 1 << 16):
            self.file.write(data[start : start + (1 << 16)])
            self.file.flush()
            print("writing", flush=True)
            time.sleep(0.01)
        return len(data)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.file.close()
    def __getattr__(self, name):
        return getattr(self.file, name)

files.open = Slow
io = AtomicCheckpointIO(metadata={"format_version": FORMAT_VERSION})
for i in range(1, 1000):
    io.save_checkpoint({"state_dict": {"w": torch.full((200_000,), float(i))}}, sys.argv[1])
    print("saved", i, flush=True)
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("pieces", [1, 7])
def test_sigkill_mid_save_leaves_the_previous_checkpoint(pieces, tmp_path, reliability) -> None:
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    saved, written = 0, 0
    try:
        for line in proc.stdout:
            if line.startswith("saved"):
                saved, written = int(line.split()[1]), 0
            elif saved and (written := written + 1) == pieces:
                break  # `pieces` pieces into the save after the first complete one
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert saved >= 1
    assert path.with_name(f".last.ckpt.tmp-{proc.pid}").is_file()  # it did die half-way through a write
    state, _ = load_checkpoint(path)
    assert torch.equal(state["w"], torch.full((200_000,), float(saved)))
    reliability.fault("checkpoint/sigkill-mid-save", survived=True)
