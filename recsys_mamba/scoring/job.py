"""The scoring job: load the model, read and shard the input, score in resumable parts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import polars as pl
from omegaconf import DictConfig
from tqdm import tqdm

from recsys_mamba import checks
from recsys_mamba.data.engines import ENGINES
from recsys_mamba.errors import RecsysError
from recsys_mamba.runs import Run, load_run
from recsys_mamba.runs.inference import topk_from_states
from recsys_mamba.runs.load import check_cuda
from recsys_mamba.schema import Bool, Check, Choice, Int, Num, PathTo, Rule, Schema
from recsys_mamba.scoring import inputs, partitions, parts, ray_job
from recsys_mamba.scoring.stream import StateStore

MODES = ("topk", "candidates", "stream")


def _ranked_id_types(run: Run, users: pl.Series, types: dict[str, pl.DataType]) -> dict[str, pl.DataType]:
    """Ids of ranked rows as the input had them: its users, and the model's items (known by their
    text) as the input's items were, when every one of them converts."""
    return {
        "user_id": inputs.output_type(users, types["user_id"]),
        "item_id": inputs.output_type(list(run.data.items.ids[1:]), types["item_id"]),
    }


def _in_shard(users: pl.DataFrame, shard: str) -> pl.DataFrame:
    return users.filter(inputs.shard_mask(users["user_id"], shard))


def _plan(run: Run, cfg: DictConfig, out: Path, prefix: str) -> tuple[partitions.Plan, dict[str, Any]]:
    """The first pass over the input (one row per user) for topk and candidates: the plan of the
    partitions every worker scores, and the manifest's counts."""
    known = list(run.data.items.index)
    scan = partitions.Scan.of(cfg.input)
    found = partitions.user_table(scan, known)
    users = _in_shard(found.table, cfg.shard)
    history = None
    if cfg.mode == "topk":
        types = _ranked_id_types(run, users["user_id"], found.types)
        cold = int((users["known"] == 0).sum())
        info = {"users": len(users), "cold_users": cold, "unknown_history_items": found.unknown}
    else:
        history = partitions.Scan.of(cfg.history or str(run.prepared_data().folder))
        past = partitions.user_table(history, known)
        warm = past.table.filter(pl.col("known") > 0)["user_id"]
        info = {
            "users": len(users),
            "cold_users": int((~users["user_id"].is_in(warm.implode())).sum()),
            "unknown_candidate_items": int(users["events"].sum() - users["known"].sum()),
            "unknown_history_items": past.unknown,
        }
        types = found.types  # the pairs' ids, as the input had them
        # a partition holds its users' pairs and their histories: both count towards its size
        past_events = past.table.select("user_id", pl.col("events").alias("past"))
        users = users.join(past_events, on="user_id", how="left", maintain_order="left").with_columns(
            pl.col("events") + pl.col("past").fill_null(0)
        )
    settings = {k: cfg[k] for k in ("mode", "chunk_size", "top_k", "exclude_seen", "pause_s")}
    cut = partitions.cut(users, cfg.chunk_size, cfg.partition_events)
    where = str(out.absolute())  # as the Ray workers see it, wherever they start
    plan = partitions.Plan(**settings, out=where, prefix=prefix, scan=scan, history=history, types=types)
    plan.partitions = cut
    return plan, info


def _partitioned(run: Run, cfg: DictConfig, out: Path, prefix: str) -> tuple[list, dict[str, Any]]:
    """topk and candidates: the input streamed partition by partition, here or on Ray workers."""
    plan, info = _plan(run, cfg, out, prefix)
    if cfg.engine == "ray":
        return ray_job.score_on_ray(plan, cfg), info
    run.to(cfg.device)
    count = len(plan.partitions)
    written = []
    for index in tqdm(range(count), desc=prefix, unit="partition", disable=not cfg.progress):
        written += partitions.score_partition(run, plan, index)
    return written, info


def _stream(run: Run, cfg: DictConfig, out: Path, prefix: str) -> tuple[list, dict[str, Any]]:
    store = StateStore(run.model.encoder)
    if cfg.state_in:
        store.load(Path(cfg.state_in))
    events, types = inputs.read_events_typed(cfg.input)
    events = events.filter(inputs.shard_mask(events["user_id"], cfg.shard))
    known, unknown = inputs.to_model_space(run.data, events)
    store.consume(known, cfg.chunk_size * 64, cfg.progress)
    state_out = Path(cfg.state_out) if cfg.state_out else out / f"state-{prefix}.parquet"
    store.save(state_out)
    users = store.table()
    types = _ranked_id_types(run, users["user_id"], types)

    def score(chunk: pl.DataFrame) -> pl.DataFrame:
        hidden = store.hidden(chunk["user_id"].to_list())
        return inputs.with_id_types(topk_from_states(run, hidden, chunk, cfg.top_k, cfg.exclude_seen), types)

    chunks = partitions.chunked(users, cfg.chunk_size)
    parts_ = parts.run_parts(out, prefix, chunks, score, cfg.progress, cfg.pause_s)
    info = {"users": len(users), "events": len(known), "unknown_items": unknown, "state": str(state_out)}
    return parts_, info


def _required(cfg: DictConfig) -> None:
    for key in ("ckpt_path", "input", "output"):
        if checks.select(cfg, key, default=None) in (None, ""):
            raise RecsysError(f"{key}=... is required, e.g. python -m recsys_mamba.score {key}=PATH")


def _engine(cfg: DictConfig) -> None:
    engine, mode = checks.select(cfg, "engine", default="local"), checks.select(cfg, "mode", None)
    if engine == "ray" and mode == "stream":
        raise RecsysError(
            "engine=ray scores mode=topk and mode=candidates; mode=stream carries each user's state "
            "from event to event in one process: run it with engine=local (and shard=I/N to split users)"
        )


def _device(cfg: DictConfig) -> None:
    device = checks.select(cfg, "device", default="cpu")
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise RecsysError(f"device={device!r} is not a device: use cpu, cuda or cuda:N (e.g. device=cuda:0)")
    if device == "cpu":
        return
    mode, engine = checks.select(cfg, "mode", None), checks.select(cfg, "engine", default="local")
    if mode == "stream":
        raise RecsysError(
            f"device={device}: mode=stream updates one event at a time, on the CPU; set device=cpu, or score "
            "on a GPU with mode=topk or mode=candidates"
        )
    if engine == "ray":
        if device != "cuda":
            raise RecsysError(
                f"device={device} with engine=ray: Ray gives each actor a GPU of its own, so name none; "
                "set device=cuda"
            )
        return  # the driver needs no GPU: each actor checks its own
    check_cuda(device)


# Every value of conf/score.yaml, checked before the model is loaded or any input read.
SCORE = Schema(
    Rule("mode", Choice(MODES)),
    Check(_required),
    Rule("ckpt_path", PathTo("exists", what="a .ckpt file from a train run, or an exported bundle folder")),
    Rule("input", PathTo("exists", what="an event log, pairs file or prepared folder")),
    Rule("output", PathTo("out_dir")),
    Rule("prepared", PathTo("prepared", optional=True)),
    Rule("history", PathTo("exists", optional=True)),
    Rule("top_k", Int(1, 1 << 20, example=10)),
    Rule("chunk_size", Int(1, 1 << 24, example=1024)),
    Rule("max_len", Int(1, 1 << 24, optional=True, example=200)),
    Rule("exclude_seen", Bool()),
    Rule("progress", Bool()),
    Rule("pause_s", Num(minimum=0, maximum=3600, example=0.0)),
    Rule("shard", inputs.Shard()),
    Rule("engine", Choice(ENGINES)),
    Check(_engine),
    Rule("partition_events", Int(1, 1 << 40, example=2_000_000)),
    Rule("workers", Int(1, 1 << 16, example=2)),
    Check(_device),
    Rule("state_in", PathTo("file", optional=True)),
    Rule("state_out", PathTo("out_file", optional=True)),
)


def validate_config(cfg: DictConfig) -> None:
    SCORE.validate(cfg)


def score(cfg: DictConfig) -> Path:
    """Run the job `cfg` describes (conf/score.yaml); returns the `_SUCCESS` manifest's path."""
    validate_config(cfg)
    out = parts.prepare_output(cfg.output, cfg.shard)
    run = load_run(cfg.ckpt_path, cfg.prepared, cfg.max_len)
    prefix = parts.part_prefix(cfg.mode, cfg.shard)
    job = {"topk": _partitioned, "candidates": _partitioned, "stream": _stream}[cfg.mode]
    written, info = job(run, cfg, out, prefix)
    settings = {k: cfg.get(k) for k in ("mode", "shard", "top_k", "exclude_seen", "chunk_size")}
    return parts.write_success(
        out,
        parts.success_name(cfg.shard),
        written,
        {**settings, "ckpt_path": str(cfg.ckpt_path), "input": str(cfg.input), **info},
    )
