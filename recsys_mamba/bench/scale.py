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
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
from omegaconf import DictConfig, OmegaConf

from recsys_mamba import checks
from recsys_mamba.bench._harness import machine, write_result
from recsys_mamba.bench.pipeline import generate_log, run_prepare
from recsys_mamba.config import hydra_entry
from recsys_mamba.errors import RecsysError
from recsys_mamba.schema import Bool, Check, Int, IntList, Num, PathTo, Rule, Schema, Seed


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
        case = {
            "events": int(events),
            "command": "python -m recsys_mamba.prepare " + " ".join(overrides),
            "buckets": math.ceil(case["events_in"] / bucket_events) if buckets == "null" else int(buckets),
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


# name -> section; a new section registers itself here and gets a block of its own in the config
SECTIONS: dict[str, Callable[[DictConfig, Path], dict[str, Any]]] = {"prepare": section_prepare}


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


def _overrides(cfg: DictConfig) -> None:
    for key in ("prepare.data", "prepare.run"):
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
    Check(_overrides),
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
