"""`python -m recsys_mamba.bench scale [sections=[prepare]] [key=value ...]`: cost as the log grows.

The benchmark is a list of sections, each a function `(cfg, work_dir) -> dict` registered in
`SECTIONS` under its name; `sections=[...]` picks which run (in that order), each with its own block
in conf/bench_scale.yaml, and the JSON result holds one entry per section. Scoring and training
sections are meant to be added the same way.

`prepare`: synthetic event logs of each size in `prepare.sizes` (Parquet, generated row group by row
group by `bench/pipeline.py`'s generator, so generating is bounded in memory too; `prepare.events_per_user`
events per user on average), each prepared by `python -m recsys_mamba.prepare` in a child process.
Per size: wall time end to end, events/s, child CPU time and peak RSS (`os.wait4`), the number of
buckets, and whether the goals (`prepare.goals`) are met. Sizes run one after another, never at once.

`score`: the scoring job's cost as its input grows. A tiny model is trained on a small log of the same
generator (`score.train_events`), then a generated input of each size in `score.sizes` is scored by
`python -m recsys_mamba.score` (mode=topk, engine=local) in a child: wall time, users/s and peak RSS,
which streaming keeps flat in the input's size (`peak_rss_max_over_min`). The input of `score.ray_size`
events is also scored with engine=ray and each of `score.ray_workers` workers (a local Ray the child
starts): users/s and the speed-up over the first (the driver's RSS only: workers are other processes).

`datamodule`: the training data's memory. A data set (`datamodule.data`, e.g. [data=ml1m]) and a
generated log of each size in `datamodule.generated` (the prepare section's generator and data
overrides) are each prepared once; then for each store in `datamodule.stores` a fresh child process
sets up the `RecDataModule` on it and reads one training epoch: `mapped` (the memory-mapped store
training uses), `memory` (the same arrays read into memory) and `memory_int64` (in memory, every
array int64: the store before it was mapped). Per store: RSS after the imports, after setup and
after the epoch, split into anonymous memory (the process's own) and file pages (mapped pages,
shared with the page cache, which the kernel drops under pressure), and the child's peak RSS
(`os.wait4`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
from omegaconf import DictConfig, OmegaConf

from recsys_mamba import checks
from recsys_mamba.bench._harness import machine, write_result
from recsys_mamba.bench.pipeline import generate_log, run_child, run_prepare
from recsys_mamba.config import hydra_entry
from recsys_mamba.data.engines import DEFAULT_WORKERS
from recsys_mamba.errors import RecsysError
from recsys_mamba.schema import Bool, Check, Choice, Int, IntList, Num, PathTo, Rule, Schema, Seed, Subset


def _log(work: Path, p: dict[str, Any], events: int) -> tuple[Path, float | None]:
    """The generated log of `events` events (reused when a kept one is there), and seconds to make it."""
    users = max(1, events // int(p["events_per_user"]))
    log = work / f"log-{events}-{users}-{p['n_items']}-{p['seed']}.parquet"
    if log.is_file():
        return log, None
    started = time.perf_counter()
    tmp = log.with_name(f".{log.name}.tmp")
    generate_log(tmp, events, users, int(p["n_items"]), int(p["seed"]), int(p["chunk"]))
    os.replace(tmp, log)
    return log, round(time.perf_counter() - started, 1)


def _goals(case: dict[str, Any], goals: dict[str, Any]) -> dict[str, Any]:
    rss_gb = case["peak_rss_mib"] / 1024 * (2**30 / 1e9)  # GB, as the goal is stated
    return {
        "peak_rss_gb": {"value": round(rss_gb, 2), "goal": f"<= {goals['peak_rss_gb']}"},
        "events_per_s": {"value": case["events_per_s"], "goal": f">= {goals['events_per_s']:,}"},
        "met": rss_gb <= goals["peak_rss_gb"] and case["events_per_s"] >= goals["events_per_s"],
    }


def section_prepare(cfg: DictConfig, work: Path) -> dict[str, Any]:
    p = OmegaConf.to_container(cfg.prepare, resolve=True)
    assert isinstance(p, dict)
    cases = []
    for events in p["sizes"]:
        log, generated = _log(work, p, int(events))
        overrides = ["data=events", f"data.path={log}", f"data.name=scale{events}", *p["data"], *p["run"]]
        out = work / f"prepared-{events}"
        try:
            case = run_prepare(overrides, out, work / "hydra")
        finally:
            shutil.rmtree(out, ignore_errors=True)
            if not p["keep_logs"]:
                log.unlink(missing_ok=True)
        bucket_events = next(
            (int(o.split("=", 1)[1]) for o in p["run"] if o.startswith("bucket_events=")), 4_000_000
        )
        buckets = next((o.split("=", 1)[1] for o in p["run"] if o.startswith("buckets=")), "null")
        workers = next(
            (int(o.split("=", 1)[1]) for o in p["run"] if o.startswith("workers=")), DEFAULT_WORKERS
        )
        case = {
            "events": int(events),
            "command": "python -m recsys_mamba.prepare " + " ".join(overrides),
            "buckets": math.ceil(case["events_in"] / bucket_events) if buckets == "null" else int(buckets),
            "workers": workers,
            **case,
            "generate_s": generated,
        }
        case["goals"] = _goals(case, p["goals"])
        cases.append(case)
        print(
            f"prepare {events:,} events: {case['wall_s']:.1f} s end to end "
            f"({case['events_per_s']:,} events/s), CPU {case['cpu_s']:.1f} s, "
            f"peak RSS {case['peak_rss_mib']:,.0f} MiB, {case['buckets']} buckets; "
            f"goals {'met' if case['goals']['met'] else 'NOT met'}",
            flush=True,
        )
    return {"cases": cases}


def _rss_mib() -> dict[str, float]:
    """This process's resident memory (MiB): all of it, anonymous, and file-backed (mapped files)."""
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}
    out: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            out[fields[key]] = round(int(value.split()[0]) / 1024, 1)  # kB
    return out


def datamodule_child(prepared: str, store: str, task: str, max_len: int, batch_size: int) -> None:
    """In a fresh process: a RecDataModule set up on `prepared` with its sequences in `store`, one
    training epoch read; prints the RSS at each stage as JSON."""
    import numpy as np

    from recsys_mamba.data.format import SEQUENCES
    from recsys_mamba.sequences import PreparedData, SequenceStore
    from recsys_mamba.training.datamodule import RecDataModule

    stages = {"imports": _rss_mib()}
    dm = RecDataModule(data={}, task=task, max_len=max_len, batch_size=batch_size, prepared_dir=prepared)
    if store != "mapped":
        memory = SequenceStore.from_frame(PreparedData.open(prepared).read(SEQUENCES))
        if store == "memory_int64":
            wide = {"users": memory.users, "start": memory.start, "length": memory.length}
            wide |= {"split_first": memory.first, **memory.flat}
            memory = SequenceStore({k: np.asarray(v, dtype=np.int64) for k, v in wide.items()})
        PreparedData.store = property(lambda self: memory)  # type: ignore[assignment,method-assign]
    dm.setup("fit")
    stages["setup"] = _rss_mib()
    batches = sum(1 for _ in dm.train_dataloader())
    stages["epoch"] = _rss_mib()
    print(json.dumps({"stages": stages, "train_batches": batches}))


def _datamodule_case(prepared: Path, store: str, d: dict[str, Any]) -> dict[str, Any]:
    args = [str(prepared), store, d["task"], int(d["max_len"]), int(d["batch_size"])]
    code = f"from recsys_mamba.bench.scale import datamodule_child; datamodule_child(*{args!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RecsysError(f"benchmark child failed (store={store}):\n{out}{err}")
    found = json.loads(out.strip().splitlines()[-1])
    stages = found["stages"]
    return {
        "store": store,
        **{f"{stage}_{kind}_mib": v for stage, values in stages.items() for kind, v in values.items()},
        "datamodule_anon_mib": round(stages["epoch"]["anon"] - stages["imports"]["anon"], 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
        "train_batches": found["train_batches"],
    }


def _datamodule_set(overrides: list[str], label: str, work: Path, d: dict[str, Any]) -> dict[str, Any]:
    """One data set prepared from `overrides`, then one child per store; the prepared folder removed after."""
    from recsys_mamba.sequences.mapped import open_store

    prepared = work / "datamodule-prepared"
    try:
        prepared_case = run_prepare(overrides, prepared, work / "hydra")
        open_store(prepared)  # built once here, so no child pays for it
        cases = [_datamodule_case(prepared, store, d) for store in d["stores"]]
    finally:
        shutil.rmtree(prepared, ignore_errors=True)
    for case in cases:
        print(
            f"datamodule {label} store={case['store']}: {case['datamodule_anon_mib']:,.1f} MiB anonymous "
            f"memory added by setup and one epoch (RSS {case['epoch_rss_mib']:,.1f} MiB, of it mapped files "
            f"{case['epoch_file_mib']:,.1f} MiB), peak RSS {case['peak_rss_mib']:,.1f} MiB",
            flush=True,
        )
    return {
        "data": label,
        "command": "python -m recsys_mamba.prepare " + " ".join(overrides),
        "n_interactions": prepared_case["n_interactions"],
        "cases": cases,
    }


def section_datamodule(cfg: DictConfig, work: Path) -> dict[str, Any]:
    d = OmegaConf.to_container(cfg.datamodule, resolve=True)
    p = OmegaConf.to_container(cfg.prepare, resolve=True)
    assert isinstance(d, dict) and isinstance(p, dict)
    sets = []
    if d["data"]:
        sets.append(_datamodule_set(list(d["data"]), " ".join(d["data"]), work, d))
    for events in d["generated"]:
        # the prepare section's generator and data overrides, so its logs and these are the same data
        log, _ = _log(work, p, int(events))
        overrides = ["data=events", f"data.path={log}", f"data.name=scale{events}", *p["data"]]
        try:
            sets.append(_datamodule_set(overrides, f"generated {int(events):,} events", work, d))
        finally:
            if not p["keep_logs"]:
                log.unlink(missing_ok=True)
    return {"sets": sets}


def _train_scorer(work: Path, s: dict[str, Any]) -> Path:
    """A tiny model trained on a small log of the same generator (the same item ids as the inputs it
    scores): its checkpoint. What it scores does not matter here, only what scoring costs."""
    log, _ = _log(work, s, int(s["train_events"]))
    run, cache = work / "score-train", work / "score-cache"
    cmd = [
        sys.executable,
        "-m",
        "recsys_mamba.train",
        "data=events",
        f"data.path={log}",
        "data.name=scalescore",
    ]
    cmd += [*s["data"], *s["train"], f"paths.output_dir={run}", f"paths.cache_dir={cache}"]
    run_child([*cmd, f"hydra.run.dir={work / 'hydra'}"])
    return run / "checkpoints" / "last.ckpt"


def _score_case(ckpt: Path, log: Path, out: Path, work: Path, run: list[str]) -> dict[str, Any]:
    """One `score` child on `log`: wall seconds, peak RSS (of the driver) and users/s."""
    args = [f"ckpt_path={ckpt}", f"input={log}", f"output={out}", "progress=false", *run]
    try:
        child = run_child(
            [sys.executable, "-m", "recsys_mamba.score", *args, f"hydra.run.dir={work / 'hydra'}"]
        )
        manifest = json.loads((out / "_SUCCESS").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "command": "python -m recsys_mamba.score " + " ".join(a for a in args if not a.startswith("output=")),
        **child,
        "users": manifest["users"],
        "parts": len(manifest["parts"]),
        "users_per_s": round(manifest["users"] / child["wall_s"]),
    }


def section_score(cfg: DictConfig, work: Path) -> dict[str, Any]:
    s = OmegaConf.to_container(cfg.score, resolve=True)
    assert isinstance(s, dict)
    ckpt = _train_scorer(work, s)
    cases, ray_cases = [], []
    for events in s["sizes"]:
        log, generated = _log(work, s, int(events))
        try:
            case = {"events": int(events), **_score_case(ckpt, log, work / "scored", work, s["run"])}
            if int(events) == int(s["ray_size"]):
                for workers in s["ray_workers"]:
                    run = [*s["run"], "engine=ray", f"workers={workers}"]
                    found = _score_case(ckpt, log, work / "scored", work, run)
                    ray_cases.append({"events": int(events), "workers": int(workers), **found})
        finally:
            log.unlink(missing_ok=True)
        cases.append({**case, "generate_s": generated})
        print(
            f"score {events:,} events ({case['users']:,} users): {case['wall_s']:.1f} s end to end "
            f"({case['users_per_s']:,} users/s), peak RSS {case['peak_rss_mib']:,.0f} MiB",
            flush=True,
        )
    for case in ray_cases:
        case["speedup_vs_first"] = round(case["users_per_s"] / ray_cases[0]["users_per_s"], 2)
        print(
            f"score engine=ray workers={case['workers']} {case['events']:,} events: {case['wall_s']:.1f} s "
            f"({case['users_per_s']:,} users/s, x{case['speedup_vs_first']} of the first)",
            flush=True,
        )
    rss = [c["peak_rss_mib"] for c in cases]
    return {
        "cases": cases,
        "ray": ray_cases,
        "peak_rss_max_over_min": round(max(rss) / min(rss), 2) if rss else None,
    }


# name -> section; a new section registers itself here and gets a block of its own in the config
SECTIONS: dict[str, Callable[[DictConfig, Path], dict[str, Any]]] = {
    "prepare": section_prepare,
    "datamodule": section_datamodule,
    "score": section_score,
}


def bench(cfg: DictConfig) -> dict[str, Any]:
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    load = round(os.getloadavg()[0], 2)  # other work on the machine slows the wall-clock figures
    result: dict[str, Any] = {
        "benchmark": "scale",
        "machine": {**machine(), "polars": pl.__version__, "load_average_1m_at_start": load},
        "config": OmegaConf.to_container(cfg, resolve=False),
        "sections": {},
    }
    try:
        for name in cfg.sections:
            started = time.perf_counter()
            result["sections"][name] = {**SECTIONS[name](cfg, work)}
            result["sections"][name]["section_s"] = round(time.perf_counter() - started, 1)
    finally:
        if not cfg.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return result


def _sections(cfg: DictConfig) -> None:
    sections = checks.subset(checks.select(cfg, "sections", None), "sections", list(SECTIONS))
    if len(set(sections)) != len(sections):
        raise RecsysError(f"sections={sections!r} names a section twice; list each once, e.g. [prepare]")


def _datamodule_sets(cfg: DictConfig) -> None:
    if "datamodule" in cfg.sections and not cfg.datamodule.data and not cfg.datamodule.generated:
        raise RecsysError(
            "the datamodule section has no data set: set datamodule.data (e.g. [data=ml1m]) or "
            "datamodule.generated (e.g. [100000000])"
        )


def _overrides(cfg: DictConfig) -> None:
    for key in ("prepare.data", "prepare.run", "datamodule.data", "score.data", "score.train", "score.run"):
        overrides = checks.select(cfg, key, None)
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise RecsysError(f"{key}={overrides!r} must be a list of key=value overrides")


# Every value of conf/bench_scale.yaml, before a log is generated or anything prepared.
BENCH_SCALE = Schema(
    Check(_sections),
    Rule("keep_work", Bool()),
    Rule("work_dir", PathTo("out_dir")),
    Rule("out_file", PathTo("out_file")),
    Rule("prepare.sizes", IntList(1, 10**11, example="[20000000]")),
    Rule("prepare.events_per_user", Int(1, example=100)),
    Rule("prepare.n_items", Int(1, 10**9, example=100_000)),
    Rule("prepare.seed", Seed()),
    Rule("prepare.chunk", Int(1, 10**9, example=2_000_000)),
    Rule("prepare.keep_logs", Bool()),
    Rule("prepare.goals.peak_rss_gb", Num(above=0, example=3)),
    Rule("prepare.goals.events_per_s", Num(above=0, example=2e6)),
    Rule("datamodule.generated", IntList(1, 10**11, allow_empty=True, example="[100000000]")),
    Rule("datamodule.task", Choice(("next_item", "ctr"))),
    Rule("datamodule.max_len", Int(1, 10**6, example=200)),
    Rule("datamodule.batch_size", Int(1, 10**7, example=128)),
    Rule("datamodule.stores", Subset(("mapped", "memory", "memory_int64"))),
    Rule("score.sizes", IntList(1, 10**11, example="[2000000]")),
    Rule("score.events_per_user", Int(1, example=100)),
    Rule("score.n_items", Int(1, 10**9, example=20_000)),
    Rule("score.seed", Seed()),
    Rule("score.chunk", Int(1, 10**9, example=2_000_000)),
    Rule("score.train_events", Int(1, 10**11, example=200_000)),
    Rule("score.ray_size", Int(0, 10**11, example=2_000_000)),
    Rule("score.ray_workers", IntList(1, 1 << 16, example="[1, 2]")),
    Check(_overrides),
    Check(_datamodule_sets),
)


def validate_config(cfg: DictConfig) -> None:
    BENCH_SCALE.validate(cfg)


@hydra_entry("bench_scale")
def main(cfg: DictConfig) -> dict[str, Any]:
    validate_config(cfg)
    result = bench(cfg)
    out = write_result(cfg.out_file, result)
    print(f"result: {out}")
    return result


if __name__ == "__main__":
    main()
