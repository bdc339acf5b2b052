"""`python -m recsys_mamba.bench state [runs=[FOLDER]]`: what the SSM state size costs and buys.

Speed: for each d_state, an untrained Mamba encoder of the configured size (speed does not depend on
the weights) encodes the same batches; the d_state values are interleaved within every repeat so
machine noise hits all of them alike, and the median inference tokens/s is kept. Accuracy: when `runs`
names the multirun folder of `experiment=bench_ml1m_state`, each d_state's test NDCG@10 is read from
its metrics.json (mean over seeds). Then every halving N -> N/2 is set against the claim "halving the
state makes inference about 40% faster for about 2% less accuracy".
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from omegaconf import DictConfig

from recsys_mamba import checks
from recsys_mamba.bench._harness import machine, seconds, write_result
from recsys_mamba.bench.accuracy import find_runs, group_runs, summarise
from recsys_mamba.config import hydra_entry
from recsys_mamba.errors import RecsysError
from recsys_mamba.files import write_atomic, write_text_atomic
from recsys_mamba.runs import build_encoder
from recsys_mamba.schema import Int, IntList, PathList, PathTo, Rule, Schema, Seed, Text

# The claim under test, and how far from it a measured halving may be and still count as agreeing.
CLAIM_SPEEDUP, CLAIM_LOSS = 0.40, 0.02
SPEEDUP_BAND, LOSS_BAND = (0.25, 0.55), (0.0, 0.05)


# Every value of conf/bench_state.yaml, checked before anything is built.
BENCH_STATE = Schema(
    Rule("d_states", IntList(1, 1024, example="[4,8,16,32,64,128]")),
    Rule("seed", Seed()),
    Rule("threads", Int(1, 1024, optional=True, example=2)),
    Rule("batch_size", Int(1, 1 << 16, example=8)),
    Rule("length", Int(1, 1 << 20, example=8)),
    Rule("repeats", Int(1, 1000, example=8)),
    Rule("n_items", Int(1, 1 << 26, example=8)),
    Rule("runs", PathList(PathTo("exists", what="a multirun folder"), example="[<multirun folder>]")),
    Rule("metric", Text(example="unmasked_ndcg@10")),
    Rule("output_json", PathTo("out_file")),
)


def validate_config(cfg: DictConfig) -> list[int]:
    """The d_states, sorted, once every value is checked."""
    BENCH_STATE.validate(cfg)
    return sorted(set(checks.select(cfg, "d_states")))


def inference_speed(cfg: DictConfig, d_states: list[int]) -> dict[int, dict[str, Any]]:
    """Median inference tokens/s of `encode` per d_state, measured interleaved."""
    torch.manual_seed(cfg.seed)
    models = {d: build_encoder(cfg.model, n_items=int(cfg.n_items), d_state=d).eval() for d in d_states}
    items = torch.randint(1, int(cfg.n_items) + 1, (int(cfg.batch_size), int(cfg.length)))
    batch = {"items": items, "lengths": torch.full((int(cfg.batch_size),), int(cfg.length))}
    times: dict[int, list[float]] = {d: [] for d in d_states}
    with torch.inference_mode():
        for model in models.values():  # warm-up: numba compilation, allocator
            model.encode(batch)
        for _ in range(int(cfg.repeats)):
            for d, model in models.items():
                times[d].append(seconds(lambda m=model: m.encode(batch)))
    tokens = items.numel()
    return {
        d: {"tokens_per_s": tokens / statistics.median(t), "seconds": t, "tokens_per_call": tokens}
        for d, t in times.items()
    }


def accuracy(folders: list[str], metric: str) -> dict[int, dict[str, Any]]:
    """Test `metric` (mean over seeds) per d_state from finished runs of the state sweep."""
    out: dict[int, dict[str, Any]] = {}
    for group in group_runs(find_runs(folders)):
        row = summarise(group)
        d_state = row["settings"].get("model.d_state")
        if d_state is None:  # one d_state only: read it from the run's config
            config = group["runs"][0]["config"]
            d_state = json.loads(config.get("model.d_state", "null"))
        if d_state is None or row["model"] != "mamba":
            continue
        out[int(d_state)] = {
            "value": row["metrics"].get(metric, {}).get("mean"),
            "seeds": row["seeds"],
            "runs": row["runs"],
        }
    if not out:
        raise RecsysError(f"no mamba runs with a d_state under {folders}; pass the bench_ml1m_state multirun")
    return out


def halvings(speed: dict[int, dict[str, Any]], acc: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for d in sorted(speed):
        half = d // 2
        if half not in speed or d % 2:
            continue
        row: dict[str, Any] = {
            "from": d,
            "to": half,
            "speedup": speed[half]["tokens_per_s"] / speed[d]["tokens_per_s"] - 1.0,
        }
        a, b = acc.get(d, {}).get("value"), acc.get(half, {}).get("value")
        row["accuracy_loss"] = (1.0 - b / a) if a and b is not None else None
        rows.append(row)
    return rows


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether the halvings agree with the claim: median speed-up and accuracy loss inside the bands."""
    if not rows:
        return {"verdict": "not tested (no halving pairs)"}
    speedup = statistics.median(r["speedup"] for r in rows)
    losses = [r["accuracy_loss"] for r in rows if r["accuracy_loss"] is not None]
    loss = statistics.median(losses) if losses else None
    fast = SPEEDUP_BAND[0] <= speedup <= SPEEDUP_BAND[1]
    cheap = loss is not None and LOSS_BAND[0] <= loss <= LOSS_BAND[1]
    if loss is None:
        part = "confirmed" if fast else "refuted"
        text = f"speed part {part}: median speed-up {speedup:+.1%}; accuracy not measured"
    elif fast and cheap:
        text = f"confirmed: median speed-up {speedup:+.1%}, median accuracy loss {loss:.1%}"
    else:
        text = (
            f"refuted: median speed-up {speedup:+.1%} (claim +40%), "
            f"median accuracy loss {loss:.1%} (claim 2%)"
        )
    return {
        "verdict": text,
        "median_speedup": speedup,
        "median_accuracy_loss": loss,
        "bands": {"speedup": SPEEDUP_BAND, "accuracy_loss": LOSS_BAND},
    }


def plot(speed: dict[int, dict[str, Any]], acc: dict[int, dict[str, Any]], metric: str, path: Path) -> None:
    d_states = sorted(speed)
    fig, left = plt.subplots(figsize=(6, 4))
    left.plot(d_states, [speed[d]["tokens_per_s"] for d in d_states], "o-", color="tab:blue")
    left.set_xscale("log", base=2)
    left.set_xlabel("d_state")
    left.set_ylabel("inference tokens/s", color="tab:blue")
    if acc:
        right = left.twinx()
        known = [d for d in d_states if acc.get(d, {}).get("value") is not None]
        right.plot(known, [acc[d]["value"] for d in known], "s--", color="tab:red")
        right.set_ylabel(f"test {metric}", color="tab:red")
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    metric = result["metric"]
    lines = [f"| d_state | inference tokens/s | test {metric} |", "|---|---|---|"]
    for d, s in sorted(result["speed"].items(), key=lambda kv: int(kv[0])):
        a = result["accuracy"].get(d, {}).get("value")
        lines.append(f"| {d} | {s['tokens_per_s']:,.0f} | {'n/a' if a is None else f'{a:.4f}'} |")
    lines += ["", "| halving | speed-up | accuracy loss |", "|---|---|---|"]
    for r in result["halvings"]:
        loss = "n/a" if r["accuracy_loss"] is None else f"{r['accuracy_loss']:.1%}"
        lines.append(f"| {r['from']} -> {r['to']} | {r['speedup']:+.1%} | {loss} |")
    lines += ["", f"Claim (halving the state: ~40% faster, ~2% less accurate): {result['claim']['verdict']}"]
    return "\n".join(lines) + "\n"


@hydra_entry("bench_state")
def main(cfg: DictConfig) -> dict[str, Any]:
    d_states = validate_config(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    speed = inference_speed(cfg, d_states)
    acc = accuracy([str(f) for f in cfg.runs], cfg.metric) if cfg.runs else {}
    rows = halvings(speed, acc)
    result = {
        "machine": machine(),
        "shape": {"batch_size": int(cfg.batch_size), "length": int(cfg.length), "n_items": int(cfg.n_items)},
        "metric": str(cfg.metric),
        "speed": {str(d): v for d, v in speed.items()},
        "accuracy": {str(d): v for d, v in acc.items()},
        "halvings": rows,
        "claim": verdict(rows),
    }
    out = write_result(cfg.output_json, result)
    plot(speed, acc, str(cfg.metric), out.with_suffix(".png"))
    table = markdown(result)
    write_text_atomic(out.with_suffix(".md"), table)
    print(table)
    print(f"results: {out}")
    return result
