"""`python -m recsys_mamba.bench contention`: how much the numba scan and torch's ops slow down when other
jobs hold the cores, under each OpenMP wait policy.

Three workloads, each a forward + backward at ML-1M's training shape (batch x max_len tokens):
- `scan`: the numba selective scan alone (`selective_scan`, backend cpu);
- `torch`: the PyTorch ops around it in a Mamba block (in_proj, SiLU, out_proj at the same widths);
- `train_step`: a whole Mamba encoder, where the two alternate.

For every round, policy and load (the number of busy processes started beside it), a fresh worker
process (the policy is read once, when libgomp loads) times each workload; the result is the median over
rounds of each worker's median, and the slowdown of each workload under load against the same
policy's quiet run. Goal: under load the scan slows down no more than the torch ops do.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Any

from omegaconf import DictConfig

from recsys_mamba.bench._harness import machine, write_result
from recsys_mamba.config import hydra_entry
from recsys_mamba.errors import RecsysError
from recsys_mamba.schema import Int, IntList, PathTo, Rule, Schema, Seed, Subset

WORKLOADS = ("scan", "torch", "train_step")
# What each policy puts in the worker's environment. "spin" pins libgomp's own default (about 3 ms of
# spinning), which `import recsys_mamba` leaves alone because GOMP_SPINCOUNT is set.
POLICIES: dict[str, dict[str, str]] = {
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "short": {"GOMP_SPINCOUNT": "10000"},  # spin about 0.1 ms, then sleep
    "spin": {"GOMP_SPINCOUNT": "300000"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
}
BURNER = "while True:\n    pass\n"  # one busy core, as another job on the machine

# The worker: builds the inputs, times each workload (warm-up, then `repeats` calls), prints JSON.
WORKER = r"""
import json, os, statistics, sys, time
spec = json.loads(sys.argv[1])
import recsys_mamba  # noqa: F401  (sets the wait policy when the environment has none)
import numba, torch
import torch.nn.functional as F
from recsys_mamba.models.mamba import MambaEncoder
from recsys_mamba.ops import selective_scan

torch.manual_seed(spec["seed"])
numba.set_num_threads(min(spec["threads"], numba.config.NUMBA_NUM_THREADS))
torch.set_num_threads(spec["threads"])
B, L, d, n = spec["batch"], spec["length"], spec["d_model"], spec["d_state"]
di = 2 * d

def leaf(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).requires_grad_()

u, dt, z = leaf(B, di, L), leaf(B, di, L, scale=0.1), leaf(B, di, L)
A, Bm, Cm, D = (-torch.rand(di, n)).requires_grad_(), leaf(B, n, L), leaf(B, n, L), leaf(di)
w_in, w_out, h = leaf(2 * di, d, scale=d ** -0.5), leaf(d, di, scale=di ** -0.5), leaf(B * L, d)
model = MambaEncoder(n_items=spec["n_items"], d_model=d, n_layers=2, d_state=n, max_len=L,
                     scan_backend="cpu").train()
items = torch.randint(1, spec["n_items"] + 1, (B, L))

def scan():
    selective_scan(u, dt, A, Bm, Cm, D=D, z=z, delta_softplus=True, backend="cpu").sum().backward()

def ops():
    x, g = F.linear(h, w_in).chunk(2, dim=-1)
    F.linear(F.silu(x) * F.silu(g), w_out).square().mean().backward()

def train_step():
    model(items).square().mean().backward()

out = {"env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}}
for name, fn in (("scan", scan), ("torch", ops), ("train_step", train_step)):
    fn()
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    out[name] = statistics.median(times) * 1e3
out["threading_layer"] = numba.threading_layer()
print(json.dumps(out))
"""


def _worker_env(policy: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy])
    env.pop("OMP_NUM_THREADS", None)  # the worker sets its thread counts itself
    env.pop("NUMBA_NUM_THREADS", None)
    return env


def run_worker(spec: dict[str, Any], policy: str, load: int, timeout_s: float) -> dict[str, Any]:
    """One worker's medians (ms per workload) with `load` busy processes running beside it."""
    burners = [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(load)]
    try:
        done = subprocess.run(
            [sys.executable, "-c", WORKER, json.dumps(spec)],
            env=_worker_env(policy),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise RecsysError(
            f"bench contention: a worker (policy={policy}, load={load}) ran past worker_timeout_s="
            f"{timeout_s:g}; lower batch or length, or raise worker_timeout_s"
        ) from e
    finally:
        for p in burners:
            p.kill()
            p.wait()
    if done.returncode != 0:
        raise RecsysError(
            f"bench contention: a worker (policy={policy}, load={load}) failed:\n{done.stderr[-2000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict[str, Any]], policies: list[str], loads: list[int]) -> list[dict[str, Any]]:
    """One row per (policy, load): the median over rounds of each workload's ms, and its slowdown against
    the same policy with no load (the median over rounds of the per-round ratios, which cancels slow
    spells of the machine that hit a whole round)."""
    rows = []
    for policy in policies:
        for load in loads:
            mine = [r for r in runs if r["policy"] == policy and r["load"] == load]
            row: dict[str, Any] = {"policy": policy, "load": load, "rounds": len(mine)}
            for name in WORKLOADS:
                row[f"{name}_ms"] = statistics.median(r[name] for r in mine)
                if loads[0] == 0:
                    quiet = {r["round"]: r[name] for r in runs if r["policy"] == policy and r["load"] == 0}
                    row[f"{name}_slowdown"] = statistics.median(r[name] / quiet[r["round"]] for r in mine)
            rows.append(row)
    return rows


def goals(rows: list[dict[str, Any]], policy: str) -> list[dict[str, Any]]:
    """Per load of `policy` (the package's default): does the scan slow down no more than torch's ops?"""
    out = []
    for row in rows:
        if row["policy"] != policy or row["load"] == 0 or "scan_slowdown" not in row:
            continue
        scan, ops = row["scan_slowdown"], row["torch_slowdown"]
        out.append({"load": row["load"], "scan_slowdown": scan, "torch_slowdown": ops, "met": scan <= ops})
    return out


def benchmark(cfg: DictConfig) -> dict[str, Any]:
    spec = {
        k: cfg[k] for k in ("seed", "threads", "batch", "length", "d_model", "d_state", "n_items", "repeats")
    }
    runs = []
    for round_ in range(cfg.rounds):  # rounds outermost: a slow spell of the machine hits every case
        for policy in cfg.policies:
            for load in cfg.loads:
                r = run_worker(spec, policy, load, cfg.worker_timeout_s)
                runs.append({"round": round_, "policy": policy, "load": load, **r})
                print(f"round {round_} {policy:8s} load {load}: " + "  ".join(
                    f"{w} {r[w]:.1f} ms" for w in WORKLOADS), flush=True)
    rows = summarize(runs, list(cfg.policies), list(cfg.loads))
    return {
        "machine": machine(),
        "config": {**spec, "rounds": cfg.rounds, "loads": list(cfg.loads), "policies": list(cfg.policies)},
        "runs": runs,
        "rows": rows,
        "goals": goals(rows, "passive"),
    }


def markdown_table(result: dict[str, Any]) -> str:
    head = "| policy | load | " + " | ".join(f"{w} ms | {w} slowdown" for w in WORKLOADS) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(WORKLOADS))]
    for r in result["rows"]:
        cells = [r["policy"], str(r["load"])]
        for w in WORKLOADS:
            cells += [f"{r[f'{w}_ms']:.1f}", f"{r[f'{w}_slowdown']:.2f}x" if f"{w}_slowdown" in r else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Every value of conf/bench_contention.yaml, before any worker starts.
BENCH_CONTENTION = Schema(
    Rule("seed", Seed()),
    Rule("threads", Int(1, 4096, example=2)),
    [Rule(key, Int(1, 1 << 20)) for key in ("batch", "length", "d_model", "d_state", "n_items")],
    Rule("repeats", Int(1, 1000, example=7)),
    Rule("rounds", Int(1, 1000, example=5)),
    Rule("worker_timeout_s", Int(1, 86_400, example=600)),
    Rule("loads", IntList(0, 64, example="[0,1]")),
    Rule("policies", Subset(tuple(POLICIES))),
    Rule("output_json", PathTo("out_file")),
)


@hydra_entry("bench_contention")
def main(cfg: DictConfig) -> dict[str, Any]:
    BENCH_CONTENTION.validate(cfg)
    result = benchmark(cfg)
    path = write_result(cfg.output_json, result)
    print(markdown_table(result))
    print("goals: " + json.dumps(result["goals"]))
    print(f"results: {path}")
    return result
