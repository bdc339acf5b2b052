"""`python -m recsys_mamba.bench pipeline`: events/s and peak memory of `prepare` as a child process.

Cases: ML-1M (`data=ml1m`) and a generated event log (default 20 million events, Parquet) prepared
with the streaming engine. Each `prepare` runs as `python -m recsys_mamba.prepare` in a child; its
wall time (process start to exit: end to end) and peak RSS (`os.wait4` rusage of that child) are
recorded. The result is written as JSON to `out_file` and printed.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from recsys_mamba import checks
from recsys_mamba.bench._harness import machine, write_result
from recsys_mamba.config import hydra_entry
from recsys_mamba.data import load_manifest
from recsys_mamba.errors import RecsysError
from recsys_mamba.schema import Bool, Check, Int, PathTo, Rule, Schema, Seed

EVENT_TYPES = np.array(["pv", "cart", "fav", "buy"])


def generate_log(path: Path, events: int, users: int, items: int, seed: int, chunk: int) -> None:
    """A Taobao-like log in time order, written row group by row group (bounded memory)."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, items + 1) ** 0.9)
    cdf /= cdf[-1]
    item_category = rng.integers(1, 200, size=items)
    span = 86400 * 9
    writer = None
    for start in range(0, events, chunk):
        m = min(chunk, events - start)
        item = np.searchsorted(cdf, rng.random(m))
        t0 = start * span // events
        table = pl.DataFrame(
            {
                "user_id": rng.integers(1, users + 1, size=m),
                "item_id": item + 1,
                "category": item_category[item],
                "event_type": EVENT_TYPES[np.searchsorted([0.89, 0.95, 0.98], rng.random(m))],
                "timestamp": 1_500_000_000
                + t0
                + np.sort(rng.integers(0, max(span * m // events, 1), size=m)),
            }
        ).to_arrow()
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    if writer is not None:
        writer.close()


def run_prepare(overrides: list[str], out_dir: Path, log_dir: Path) -> dict[str, Any]:
    """One `prepare` child: wall seconds, peak RSS (MiB) and the manifest's counts."""
    cmd = [
        sys.executable,
        "-m",
        "recsys_mamba.prepare",
        *overrides,
        f"out_dir={out_dir}",
        "overwrite=true",
        f"hydra.run.dir={log_dir}",
    ]
    child = run_child(cmd)
    manifest = load_manifest(out_dir)
    events_in = manifest["steps"][0]["rows_in"]
    return {
        "wall_s": child["wall_s"],
        "prepare_s": manifest["prepare_seconds"],
        "cpu_s": child["cpu_s"],
        "peak_rss_mib": child["peak_rss_mib"],
        "events_in": events_in,
        "n_interactions": manifest["n_interactions"],
        "events_per_s": round(events_in / child["wall_s"]),
    }


def run_child(cmd: list[str]) -> dict[str, float]:
    """Run `cmd` to its end: wall seconds, its CPU seconds and peak RSS (MiB, `os.wait4`: the child
    alone, not processes it starts); a RecsysError with its output when it fails."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RecsysError(f"benchmark child failed ({' '.join(cmd)}):\n{out}{err}")
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
    }


def _case(name: str, overrides: list[str], work: Path, repeats: int) -> dict[str, Any]:
    runs = [run_prepare(overrides, work / f"{name}-out", work / "hydra") for _ in range(repeats)]
    best = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    return {
        "case": name,
        "command": "python -m recsys_mamba.prepare " + " ".join(overrides),
        **best,
        "median_wall_s": statistics.median(r["wall_s"] for r in runs),
        "runs": runs,
    }


def bench(cfg: DictConfig) -> dict[str, Any]:
    load = round(os.getloadavg()[0], 2)  # other work on the machine slows the wall-clock figures
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cases = []
    try:
        shared = Path(cfg.paths.shared_data_dir) / "ml-1m" / "ml-1m_chrono_sequences.txt"
        if cfg.ml1m and shared.is_file():
            cases.append(_case("ml1m", ["data=ml1m"], work, cfg.repeats))
        big = cfg.big
        log = work / f"log-{big.n_events}.parquet"
        started = time.perf_counter()
        generate_log(log, big.n_events, big.n_users, big.n_items, big.seed, big.chunk)
        generated = round(time.perf_counter() - started, 2)
        overrides = ["data=events", f"data.path={log}", f"data.name=bench{big.n_events}", *big.data]
        cases.append({**_case(f"log{big.n_events}", overrides, work, cfg.repeats), "generate_s": generated})
    finally:
        if not cfg.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": "pipeline",
        "machine": {**machine(), "polars": pl.__version__, "load_average_1m_at_start": load},
        "config": OmegaConf.to_container(cfg, resolve=False),
        "cases": cases,
    }


def _overrides(cfg: DictConfig) -> None:
    overrides = checks.select(cfg, "big.data", None)
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise RecsysError(f"big.data={overrides!r} must be a list of key=value overrides of the data config")


# Every value of conf/bench_pipeline.yaml, before a log is generated or anything prepared.
BENCH_PIPELINE = Schema(
    Rule("ml1m", Bool()),
    Rule("keep_work", Bool()),
    Rule("repeats", Int(1, 100, example=1)),
    Rule("big.n_events", Int(1, 10**10, example=20_000_000)),
    Rule("big.n_users", Int(1, 10**9, example=200_000)),
    Rule("big.n_items", Int(1, 10**9, example=100_000)),
    Rule("big.seed", Seed()),
    Rule("big.chunk", Int(1, 10**9, example=2_000_000)),
    Check(_overrides),
    Rule("work_dir", PathTo("out_dir")),
    Rule("out_file", PathTo("out_file")),
)


def validate_config(cfg: DictConfig) -> None:
    BENCH_PIPELINE.validate(cfg)


@hydra_entry("bench_pipeline")
def main(cfg: DictConfig) -> dict[str, Any]:
    validate_config(cfg)
    result = bench(cfg)
    out = write_result(cfg.out_file, result)
    for c in result["cases"]:
        print(
            f"{c['case']}: {c['events_in']:,} events in {c['wall_s']:.2f} s end to end "
            f"({c['events_per_s']:,} events/s; pipeline {c['prepare_s']:.2f} s), "
            f"CPU {c['cpu_s']:.1f} s, peak RSS {c['peak_rss_mib']:,} MiB"
        )
    print(f"result: {out}")
    return result


if __name__ == "__main__":
    main()
