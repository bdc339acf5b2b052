"""The scoring job: load the model, read and shard the input, score in resumable parts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from omegaconf import DictConfig

from recsys_mamba import checks
from recsys_mamba.errors import RecsysError
from recsys_mamba.runs import Run, load_run
from recsys_mamba.runs.events import pair_frame, with_users
from recsys_mamba.runs.inference import topk_from_states
from recsys_mamba.schema import Bool, Check, Choice, Int, Num, PathTo, Rule, Schema
from recsys_mamba.scoring import batch, inputs, parts
from recsys_mamba.scoring.stream import StateStore

MODES = ("topk", "candidates", "stream")


def chunked(frame: pl.DataFrame, size: int) -> list[pl.DataFrame]:
    return [frame.slice(i, size) for i in range(0, len(frame), size)] or []


def _histories(run: Run, source: str, shard: str) -> tuple[pl.DataFrame, int, dict[str, pl.DataType]]:
    """Per-user histories of `source`'s users in `shard`, unknown events, and `source`'s id types."""
    events, types = inputs.read_events_typed(source)
    users, unknown = inputs.histories(run.data, events)
    return users.filter(inputs.shard_mask(users["user_id"], shard)), unknown, types


def _ranked_id_types(run: Run, users: pl.Series, types: dict[str, pl.DataType]) -> dict[str, pl.DataType]:
    """Ids of ranked rows as the input had them: its users, and the model's items (known by their
    text) as the input's items were, when every one of them converts."""
    return {
        "user_id": inputs.output_type(users, types["user_id"]),
        "item_id": inputs.output_type(list(run.data.items.ids[1:]), types["item_id"]),
    }


def _topk(run: Run, cfg: DictConfig, out: Path, prefix: str) -> tuple[list, dict[str, Any]]:
    users, unknown, types = _histories(run, cfg.input, cfg.shard)
    types = _ranked_id_types(run, users["user_id"], types)
    parts_ = parts.run_parts(
        out,
        prefix,
        chunked(users, cfg.chunk_size),
        lambda u: inputs.with_id_types(batch.topk_chunk(run, u, cfg.top_k, cfg.exclude_seen), types),
        cfg.progress,
        cfg.pause_s,
    )
    cold = int((users["items"].list.len() == 0).sum())
    return parts_, {"users": len(users), "cold_users": cold, "unknown_history_items": unknown}


def _candidates(run: Run, cfg: DictConfig, out: Path, prefix: str) -> tuple[list, dict[str, Any]]:
    raw = inputs.read_table(cfg.input, inputs.EVENT_COLUMNS)
    text_file = Path(cfg.input).suffix == ".csv"
    types = {c: inputs.id_type(raw[c], text_file) for c in inputs.EVENT_COLUMNS}
    pairs = pair_frame(raw, f"input={cfg.input}")
    pairs = pairs.filter(inputs.shard_mask(pairs["user_id"], cfg.shard))
    users, unknown, _ = _histories(run, cfg.history or str(run.prepared_data().folder), cfg.shard)
    users = with_users(users, pairs["user_id"])

    def score(chunk: pl.DataFrame) -> pl.DataFrame:
        scored = batch.candidate_chunk(
            run, chunk, pairs.join(chunk.select("user_id"), on="user_id", how="semi")
        )
        return inputs.with_id_types(scored, types)  # the pairs' ids, as the input had them

    parts_ = parts.run_parts(out, prefix, chunked(users, cfg.chunk_size), score, cfg.progress, cfg.pause_s)
    known = set(run.data.items.index)
    info = {
        "users": len(users),
        "cold_users": int((users["items"].list.len() == 0).sum()),
        "unknown_candidate_items": int((~pairs["item_id"].is_in(list(known))).sum()),
        "unknown_history_items": unknown,
    }
    return parts_, info


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

    parts_ = parts.run_parts(out, prefix, chunked(users, cfg.chunk_size), score, cfg.progress, cfg.pause_s)
    info = {"users": len(users), "events": len(known), "unknown_items": unknown, "state": str(state_out)}
    return parts_, info


def _required(cfg: DictConfig) -> None:
    for key in ("ckpt_path", "input", "output"):
        if checks.select(cfg, key, default=None) in (None, ""):
            raise RecsysError(f"{key}=... is required, e.g. python -m recsys_mamba.score {key}=PATH")


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
    job = {"topk": _topk, "candidates": _candidates, "stream": _stream}[cfg.mode]
    written, info = job(run, cfg, out, prefix)
    settings = {k: cfg.get(k) for k in ("mode", "shard", "top_k", "exclude_seen", "chunk_size")}
    return parts.write_success(
        out,
        parts.success_name(cfg.shard),
        written,
        {**settings, "ckpt_path": str(cfg.ckpt_path), "input": str(cfg.input), **info},
    )
