"""Faults during training: SIGKILL at random points then resume, disk full, unwritable output.

The killed runs are real `python -m recsys_mamba.train` processes. `PhaseProbe` (loaded into them with a
`+callbacks.fault_probe` override) appends each phase it enters to a file, so kills can be spread over
data preparation, mid-epoch training, validation and checkpoint saves instead of clustering wherever a
uniform random time tends to land. (File name: pytest needs unique test module basenames here.)
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from recsys_mamba.errors import RecsysError
from tests.helpers import SMALL_QUIET_RUN, tiny_cfg

REPO = Path(__file__).resolve().parents[2]
EPOCHS, BATCHES = 4, 4
RUN = [
    f"trainer.max_epochs={EPOCHS}",
    f"trainer.limit_train_batches={BATCHES}",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    *SMALL_QUIET_RUN,
    "trainer.log_every_n_steps=1",
    "model.dropout=0.3",  # dropout on: any RNG drift after a resume would change the metrics
    "datamodule.batch_size=32",
    "datamodule.eval_batch_size=64",
    "callbacks.early_stopping.patience=10",
    "data.synthetic.n_users=160",
    "data.synthetic.n_items=120",
    "data.synthetic.n_categories=6",
    "data.synthetic.mean_events=30",
    "data.synthetic.max_events=80",
]
# Metrics that depend on wall time, not on the weights.
TIMINGS = ("train_time_s", "epoch_time_s")
# Padding makes each checkpoint write take a few milliseconds, so kills aimed at a save can land inside it.
PADDING_MB = 4


class PhaseProbe(L.Callback):
    """Appends `prep done`, `train E B`, `val E`, `save E` and `test` lines to `path` as the run goes."""

    def __init__(self, path: str, padding_mb: int = 0) -> None:
        self.path = path
        self.padding_mb = padding_mb

    def _mark(self, line: str) -> None:
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._mark("prep done")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._mark(f"train {trainer.current_epoch} {batch_idx}")

    def on_validation_start(self, trainer, pl_module) -> None:
        self._mark(f"val {trainer.current_epoch}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["fault_probe_padding"] = torch.zeros(self.padding_mb << 20, dtype=torch.uint8)
        self._mark(f"save {trainer.current_epoch}")

    def on_test_start(self, trainer, pl_module) -> None:
        self._mark("test")


def command(run: Path, cache: Path, probe: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "recsys_mamba.train",
        *RUN,
        "+callbacks.fault_probe._target_=tests.training.test_train_faults.PhaseProbe",
        f"+callbacks.fault_probe.path={probe}",
        f"+callbacks.fault_probe.padding_mb={PADDING_MB}",
        f"paths.cache_dir={cache}",
        f"hydra.run.dir={run}",
        *extra,
    ]


def run_to_end(cmd: list[str], log: Path) -> None:
    with open(log, "ab") as out:
        proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, log.read_text()[-4000:]


def compared(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in TIMINGS}


def same_metrics(got: dict[str, Any], want: dict[str, Any]) -> bool:
    got, want = compared(got), compared(want)
    if got.keys() != want.keys():
        return False
    for key, value in want.items():
        if isinstance(value, float) and isinstance(got[key], float):
            if not math.isclose(got[key], value, abs_tol=1e-5):
                return False
        elif got[key] != value:
            return False
    return True


def checkpoints_load(folder: Path) -> dict[str, bool]:
    """Every finished checkpoint file (temp files start with a dot) and whether it loads whole."""
    result = {}
    for path in sorted(folder.glob("*.ckpt")) if folder.is_dir() else []:
        if path.name.startswith("."):
            continue
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            result[path.name] = "state_dict" in ckpt and "epoch" in ckpt
        except Exception:  # a torn file fails in many ways; all mean "unusable"
            result[path.name] = False
    return result


@dataclass
class Plan:
    """Where to kill: after the `nth` probe line starting with `marker` (or, for marker "prep", once a
    temporary folder shows up in the cache; "time": `delay` seconds after start), then `delay` more."""

    marker: str
    nth: int
    delay: float


def plans(rng: random.Random, n: int, full_s: float) -> list[Plan]:
    """`n` kill points, cycling through the phases so each gets its share."""
    out = []
    for i in range(n):
        phase = ("prep", "train", "val", "save", "time")[i % 5]
        if phase == "prep":
            # Generating and preparing the tiny log takes ~50 ms after its first temporary folder appears.
            out.append(Plan("prep", 0, rng.uniform(0.0, 0.05)))
        elif phase == "train":
            out.append(Plan("train", rng.randrange(EPOCHS * BATCHES), rng.uniform(0.0, 0.05)))
        elif phase == "val":
            out.append(Plan("val", rng.randrange(EPOCHS), rng.uniform(0.0, 0.05)))
        elif phase == "save":
            # At least one save per epoch (last.ckpt; the best one only when the metric improved).
            out.append(Plan("save", rng.randrange(EPOCHS), rng.uniform(0.0, 0.02)))
        else:
            out.append(Plan("time", 0, rng.uniform(0.0, full_s)))
    return out


def probe_lines(probe: Path) -> list[str]:
    try:
        return probe.read_text().splitlines()
    except FileNotFoundError:
        return []


def reached(plan: Plan, lines: list[str], cache: Path) -> bool:
    if plan.marker == "time":
        return True
    if plan.marker == "prep":
        return any(".tmp-" in p.name for p in cache.iterdir()) if cache.is_dir() else False
    return sum(line.startswith(plan.marker + " ") for line in lines) > plan.nth


def kill_at(cmd: list[str], plan: Plan, probe: Path, cache: Path, log: Path) -> str | None:
    """Start `cmd`, SIGKILL it at `plan`; the phase it was in (last probe line), None if it finished."""
    before = len(probe_lines(probe))  # the probe file holds earlier launches' lines too
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    started = time.monotonic()
    try:
        while not reached(plan, probe_lines(probe)[before:], cache):
            if proc.poll() is not None or time.monotonic() - started > 240:
                return None
            time.sleep(0.002)
        time.sleep(plan.delay)
        if proc.poll() is not None:
            return None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = probe_lines(probe)[before:]
    return lines[-1] if lines else "start-up/prep"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The run every killed-and-resumed one must reproduce; also warms a shared data cache."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cache = root / "cache"
    started = time.monotonic()
    run_to_end(command(root / "run", cache, root / "probe.txt"), root / "log.txt")
    wall = time.monotonic() - started
    return {
        "metrics": json.loads((root / "run" / "metrics.json").read_text()),
        "wall_s": wall,
        "cache": cache,
    }


def trial(
    root: Path, plans_: list[Plan], uninterrupted: dict[str, Any], reliability, fresh_cache: bool
) -> tuple[bool, str]:
    """Kill one run at each plan in turn (each time resuming from last.ckpt, or starting over), then run
    it to the end; returns whether it survived and a description of what happened."""
    root.mkdir(parents=True, exist_ok=True)
    run, probe, log = root / "run", root / "probe.txt", root / "log.txt"
    cache = root / "cache" if fresh_cache else uninterrupted["cache"]
    story = []
    ckpt = run / "checkpoints" / "last.ckpt"
    for plan in plans_:
        resume = [f"ckpt_path={ckpt}"] if ckpt.is_file() else []
        phase = kill_at(command(run, cache, probe, *resume), plan, probe, cache, log)
        if phase is None:
            story.append(f"{plan.marker}: finished before the kill")
            continue
        loads = checkpoints_load(run / "checkpoints")
        story.append(f"{plan.marker}#{plan.nth}+{plan.delay:.3f}s killed at [{phase}], ckpts {loads}")
        usable = all(loads.values())
        # Run to the end after the last kill only; earlier kills are followed by the next one.
        if plan is plans_[-1]:
            resume = [f"ckpt_path={ckpt}"] if ckpt.is_file() else []
            run_to_end(command(run, cache, probe, *resume), log)
            metrics = json.loads((run / "metrics.json").read_text())
            matched = same_metrics(metrics, uninterrupted["metrics"])
            story.append(f"resumed: metrics {'match' if matched else 'DIFFER'}")
            ok = matched and usable and all(checkpoints_load(run / "checkpoints").values())
        else:
            ok = usable
        reliability.fault("train/sigkill", survived=ok, data_lost=not usable)
        if not ok:
            return False, "; ".join(story)
    return True, "; ".join(story)


def test_killed_twice_then_resumed_matches_uninterrupted(uninterrupted, tmp_path, reliability):
    # Mid-epoch in epoch 1, then inside a checkpoint save of the resumed run.
    kills = [Plan("train", BATCHES + 2, 0.01), Plan("save", 1, 0.002)]
    ok, story = trial(tmp_path, kills, uninterrupted, reliability, fresh_cache=False)
    assert ok, story
    assert "finished before the kill" not in story, story


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_random_kills_then_resume_match_uninterrupted(uninterrupted, tmp_path, reliability):
    rng = random.Random(20240607)
    failures, stories = [], []
    for i, plan in enumerate(plans(rng, 12, uninterrupted["wall_s"])):
        root = tmp_path / f"trial{i:02d}"
        ok, story = trial(root, [plan], uninterrupted, reliability, fresh_cache=plan.marker == "prep")
        stories.append(f"trial {i}: {story}")
        if ok:
            shutil.rmtree(root)  # keep a failed trial's folder for inspection
        else:
            failures.append(stories[-1])
    print("\n".join(stories))
    assert not failures, "\n".join(failures)


# ---- disk full, unwritable output: train's metrics.json, evaluate's report -----------------------

EARLIER = '{"earlier": "run"}\n'


def disk_full(monkeypatch: pytest.MonkeyPatch, hit: Callable[[Path], bool]) -> None:
    """`Path.write_text` to a path where `hit(path)` goes to /dev/full: the real OSError a full disk gives."""
    real = Path.write_text

    def write_text(self: Path, *args, **kwargs):
        if not hit(self):
            return real(self, *args, **kwargs)
        if not Path("/dev/full").exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(Path("/dev/full"), *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def temporary(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_disk_full_at_metrics_json_keeps_the_previous_one(
    tiny, tmp_path, cache_dir, monkeypatch, reliability
):
    from recsys_mamba.training.run import train

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text(EARLIER)
    with monkeypatch.context() as m:
        disk_full(m, lambda p: p.name.startswith(".metrics.json.tmp"))
        with pytest.raises(RecsysError) as err:
            train(tiny(out, [], cache_dir))
    message = str(err.value)
    clear = f"cannot write {out / 'metrics.json'}" in message and "No space left on device" in message
    intact = (out / "metrics.json").read_text() == EARLIER and not temporary(out)
    reliability.fault("disk-full/train-metrics", survived=clear and intact, data_lost=not intact)
    assert clear, message
    assert intact


def test_unwritable_metrics_json_is_a_clear_error(tiny, tmp_path, cache_dir, reliability):
    from recsys_mamba.training.run import train

    out = tmp_path / "run"
    (out / "metrics.json").mkdir(parents=True)  # something that is not a file is in the way
    with pytest.raises(RecsysError) as err:
        train(tiny(out, [], cache_dir))
    clear = f"cannot write {out / 'metrics.json'}" in str(err.value) and "paths.output_dir=" in str(err.value)
    reliability.fault("unwritable/train-metrics", survived=clear and not temporary(out))
    assert clear, str(err.value)


def test_unwritable_output_dir_is_a_clear_error(tiny, tmp_path, cache_dir, reliability):
    from recsys_mamba.training.run import train

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    try:
        with pytest.raises(RecsysError, match=str(blocker / "sub")):
            train(tiny(blocker / "sub", [], cache_dir))
    except BaseException:
        reliability.fault("unwritable/train-output-dir", survived=False)
        raise
    reliability.fault("unwritable/train-output-dir", survived=blocker.read_text() == "not a folder")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny checkpoint and a report folder evaluated from it."""

    from recsys_mamba.config import compose
    from recsys_mamba.evaluation import evaluate
    from recsys_mamba.training.run import train

    root = tmp_path_factory.mktemp("evaluated")
    train(tiny_cfg(root / "run", ["logger=[]"], cache_dir=root / "cache"))
    ckpt = next((root / "run" / "checkpoints").glob("epoch_*.ckpt"))
    overrides = [f"ckpt_path={ckpt}", f"out_dir={root / 'report'}", "n_bootstrap=20"]
    evaluate(compose("evaluate", overrides=overrides))
    return {"ckpt": ckpt, "report": root / "report"}


@pytest.mark.parametrize("victim", ["metrics.json", "report.md", "report.html"])
def test_disk_full_in_evaluate_keeps_the_previous_report(
    evaluated, tmp_path, monkeypatch, victim, reliability
):
    from recsys_mamba.config import compose
    from recsys_mamba.evaluation import evaluate

    out = tmp_path / "report"
    shutil.copytree(evaluated["report"], out)
    for name in ("metrics.json", "report.md", "report.html"):
        (out / name).write_text(EARLIER)  # marks the earlier report, to tell it from a rewritten one
    cfg = compose(
        "evaluate", overrides=[f"ckpt_path={evaluated['ckpt']}", f"out_dir={out}", "n_bootstrap=20"]
    )
    with monkeypatch.context() as m:
        disk_full(m, lambda p: p.name.startswith(f".{victim}.tmp"))
        with pytest.raises(RecsysError) as err:
            evaluate(cfg)
    message = str(err.value)
    clear = f"cannot write {out / victim}" in message and "No space left on device" in message
    intact = all((out / n).read_text() == EARLIER for n in ("metrics.json", "report.md", "report.html"))
    intact = intact and not temporary(out)
    reliability.fault("disk-full/evaluate", survived=clear and intact, data_lost=not intact)
    assert clear, message
    assert intact
    evaluate(cfg)  # space freed: the report is written whole
    assert (
        json.loads((out / "metrics.json").read_text())["task"] and (out / "report.html").stat().st_size > 1000
    )


def test_unwritable_evaluate_out_dir_is_a_clear_error(evaluated, tmp_path, reliability):
    from recsys_mamba.config import compose
    from recsys_mamba.evaluation import evaluate

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = compose("evaluate", overrides=[f"ckpt_path={evaluated['ckpt']}", f"out_dir={blocker / 'out'}"])
    with pytest.raises(RecsysError) as err:
        evaluate(cfg)
    clear = f"out_dir={blocker / 'out'}" in str(err.value) and "not writable" in str(err.value)
    reliability.fault("unwritable/evaluate", survived=clear and blocker.read_text() == "not a folder")
    assert clear, str(err.value)
