"""`python -m recsys_mamba.bench loss`: the next-click training loss (full softmax over every item),
forward + backward, unfused (`F.cross_entropy` of the (tokens, items) score matrix) against the
fused `ops.linear_cross_entropy`, side by side in one run."""

from __future__ import annotations

import itertools
import statistics
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from recsys_mamba.bench._harness import machine, seconds, set_threads, write_result
from recsys_mamba.config import hydra_entry
from recsys_mamba.ops.linear_ce import linear_cross_entropy
from recsys_mamba.schema import Int, IntList, PathTo, Relation, Rule, Schema, Seed


def unfused_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What `NextItemHead` computed before the fused op: score_all, then cross-entropy."""
    scores = hidden @ weight.t()
    scores[:, 0] = float("-inf")
    return F.cross_entropy(scores, targets)


METHODS = {"unfused": unfused_cross_entropy, "fused": linear_cross_entropy}


def _case(n_items: int, tokens: int, d_model: int, repeats: int) -> dict[str, Any]:
    hidden = (torch.randn(tokens, d_model) * 0.5).requires_grad_()
    weight = (torch.randn(n_items + 1, d_model) * 0.5).requires_grad_()
    targets = torch.randint(1, n_items + 1, (tokens,))

    def step(method: str) -> tuple[float, torch.Tensor]:
        hidden.grad = weight.grad = None
        out: list[torch.Tensor] = []

        def forward_backward() -> None:
            loss = METHODS[method](hidden, weight, targets)
            loss.backward()
            out.append(loss.detach())

        return seconds(forward_backward), out[0]

    times: dict[str, list[float]] = {m: [] for m in METHODS}
    losses = {}
    for method in METHODS:  # warm-up
        _, losses[method] = step(method)
    grads = {}
    for _, method in itertools.product(range(repeats), METHODS):
        sec, _ = step(method)
        times[method].append(sec)
        grads[method] = (hidden.grad.clone(), weight.grad.clone())
    med = {m: statistics.median(v) for m, v in times.items()}
    return {
        "n_items": n_items,
        "tokens": tokens,
        "d_model": d_model,
        "unfused_ms": med["unfused"] * 1e3,
        "fused_ms": med["fused"] * 1e3,
        "speedup": med["unfused"] / med["fused"],
        "loss_abs_diff": float((losses["unfused"] - losses["fused"]).abs()),
        "grad_max_abs_diff": max(
            float((a - b).abs().max()) for a, b in zip(grads["unfused"], grads["fused"], strict=True)
        ),
        "score_matrix_mib": tokens * (n_items + 1) * 4 / 2**20,
    }


def benchmark(cfg: DictConfig) -> list[dict[str, Any]]:
    if cfg.threads:
        set_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    rows = []
    for n_items, tokens in zip(cfg.n_items, cfg.tokens, strict=True):
        row = _case(int(n_items), int(tokens), int(cfg.d_model), int(cfg.repeats))
        rows.append(row)
        print(f"  items={row['n_items']:6d} tokens={row['tokens']:6d}: unfused {row['unfused_ms']:8.1f} ms, "
              f"fused {row['fused_ms']:8.1f} ms, {row['speedup']:.2f}x", flush=True)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| items | tokens | unfused ms | fused ms | speedup | score matrix MiB (unfused) | max grad diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['n_items']:,} | {r['tokens']:,} | {r['unfused_ms']:.1f} | {r['fused_ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['score_matrix_mib']:.0f} | {r['grad_max_abs_diff']:.1e} |")
    return "\n".join(lines)


# Every value of conf/bench_loss.yaml, before any tensor is allocated.
BENCH_LOSS = Schema(
    Rule("seed", Seed()),
    Rule("d_model", Int(1, 1 << 14, example=64)),
    Rule("n_items", IntList(1, 1 << 24, example="[3416,12101]")),
    Rule("tokens", IntList(1, 1 << 24, example="[6400,1600]")),
    Relation(
        ("n_items", "tokens"),
        lambda items, tokens: len(items) == len(tokens),
        "{k0} ({v0}) and {k1} ({v1}) are paired case by case; give both the same number of values, "
        "e.g. n_items=[3416] tokens=[6400]",
    ),
    Rule("repeats", Int(1, 1000, example=7)),
    Rule("threads", Int(1, 4096, optional=True)),
    Rule("output_json", PathTo("out_file")),
)


def validate_config(cfg: DictConfig) -> None:
    BENCH_LOSS.validate(cfg)


@hydra_entry("bench_loss")
def main(cfg: DictConfig) -> list[dict[str, Any]]:
    validate_config(cfg)
    rows = benchmark(cfg)
    path = write_result(cfg.output_json, {"machine": machine(), "rows": rows})
    print(markdown_table(rows))
    print(f"results: {path}")
    return rows
