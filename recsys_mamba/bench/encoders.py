"""`python -m recsys_mamba.bench encoders`: the encoders' cost against sequence length, side by side.

For every L in `lengths` and every encoder in `encoders` (same d_model and n_layers, each encoder's
other sizes from conf/model, untrained, built with max_len = L), a batch of max(1, tokens_per_batch // L)
random full-length sequences is timed:
- training step: encoder forward in train mode (dropout on) + loss mean(hidden^2) + backward through
  every parameter (item embedding included); no optimiser step and no scoring head, so what is timed
  is the encoder itself;
- inference step: `encode` under no_grad in eval mode.
Each (encoder, L) runs in its own worker process, so its memory figures start clean. The workers of
one L are alive together and the parent asks them for steps in turn (mamba, sasrec, mamba, sasrec...),
so noise from other work on the machine falls on every encoder alike; medians over `repeats` after
`warmup` untimed steps.

Peak memory is measured in one extra step per op after the timed repeats, not in the timed steps:
on CPU it is the Linux resident high-water mark (VmHWM, reset through /proc/self/clear_refs before
the step) minus the resident memory just before it (after malloc_trim, so freed heap is not counted
as in use): what the step adds on top of model, inputs and interpreter. The trim makes that step
fault its memory in afresh, which a training loop reusing its heap does not pay, so timed steps run
as a training loop's do. On CUDA: torch.cuda.max_memory_allocated minus memory_allocated before the
step.

Growth exponents are least-squares slopes of log(cost per sequence) against log L over `fit_range`
(per sequence = per step / batch, so 1 means linear in L). The crossover is the length from which the
first encoder's training tokens/s stays above the second's, interpolated in log L.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from recsys_mamba.bench._harness import (
    machine,
    numba_threads,
    paired_ratio,
    seconds,
    set_threads,
    write_result,
)
from recsys_mamba.config import hydra_entry
from recsys_mamba.errors import RecsysError
from recsys_mamba.files import write_atomic
from recsys_mamba.models.base import SequenceEncoder
from recsys_mamba.runs import build_encoder
from recsys_mamba.schema import (
    Check,
    Choice,
    Int,
    IntList,
    Num,
    NumList,
    Relation,
    Rule,
    Schema,
    Seed,
    is_int,
)

MIB = 1 << 20
MARK = b"@@bench-encoders "  # prefixes the worker's replies; anything else on its stdout is ignored
WORKER = "from recsys_mamba.bench.encoders import serve; serve()"
POLL_S = 0.1  # how often the parent checks a busy worker's resident memory
GOALS = {"train_ratio_L200": (200, 1.0), "train_ratio_L4000": (4000, 3.0)}  # issue targets, on 2 cores
MEMORY_EXPONENT_GOAL = 1.1
MEMORY_METHODS = {
    "vmhwm": "resident high-water mark (VmHWM, reset before the step) minus resident memory before it",
    "cuda": "torch.cuda.max_memory_allocated minus memory_allocated before the step",
    "unavailable": "no per-step peak on this platform (needs Linux /proc/self/clear_refs or CUDA)",
}


def build_model(conf: dict, n_items: int, d_model: int, n_layers: int, max_len: int) -> SequenceEncoder:
    """An untrained encoder from its conf/model entry, with the shared width, depth and max_len."""
    return build_encoder(conf, n_items=n_items, d_model=d_model, n_layers=n_layers, max_len=max_len)


# ---- worker side: one (encoder, L) case per process -----------------------------------------------


def _proc_status_kib(key: str, pid: int | str = "self") -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class PeakMemory:
    """Peak memory a step adds on top of what was in use before it, in bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._libc = None
        if device.type == "cuda":
            self.method = "cuda"
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the resident high-water mark
            self.method = "vmhwm" if _proc_status_kib("VmHWM") is not None else "unavailable"
        except OSError:
            self.method = "unavailable"
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            pass

    def start(self) -> int:
        if self.method == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        if self.method == "unavailable":
            return 0
        if self._libc is not None:
            self._libc.malloc_trim(0)  # give freed heap back, else the rest level includes it
        Path("/proc/self/clear_refs").write_text("5")
        return (_proc_status_kib("VmRSS") or 0) * 1024

    def peak_since(self, base: int) -> int | None:
        if self.method == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        if self.method == "unavailable":
            return None
        return max(0, (_proc_status_kib("VmHWM") or 0) * 1024 - base)


class Case:
    """One encoder at one length, with its batch of random items, timed one step at a time."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.device = torch.device(spec["device"])
        if spec["threads"]:
            set_threads(int(spec["threads"]))
        torch.manual_seed(spec["seed"])
        self.model = build_model(
            spec["model"], spec["n_items"], spec["d_model"], spec["n_layers"], spec["length"]
        ).to(self.device)
        shape = (spec["batch"], spec["length"])
        self.items = torch.randint(1, spec["n_items"] + 1, shape, device=self.device)
        self.memory = PeakMemory(self.device)

    def info(self) -> dict[str, Any]:
        return {
            "torch_threads": torch.get_num_threads(),
            "numba_threads": numba_threads(),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "memory_method": self.memory.method,
            "n_params": sum(p.numel() for p in self.model.parameters()),
        }

    def step(self, train: bool, memory: bool = False) -> dict[str, Any]:
        """One step, timed. With memory, its peak too: that resets the high-water mark and gives freed
        heap back to the system first, so the step pays page faults a training loop's reused memory
        does not (up to a quarter of a step at L = 200), which is why timed steps leave it out."""
        self.model.train(train)
        self.model.zero_grad(set_to_none=True)
        base = self.memory.start() if memory else 0

        def run() -> None:
            with torch.set_grad_enabled(train):
                hidden = self.model.encode({"items": self.items})
                if train:
                    hidden.square().mean().backward()

        took = seconds(run, self.device)
        peak = self.memory.peak_since(base) if memory else None
        return {"seconds": took, "peak_mib": None if peak is None else peak / MIB}


def _send(message: dict[str, Any]) -> None:
    sys.stdout.buffer.write(MARK + json.dumps(message).encode() + b"\n")
    sys.stdout.buffer.flush()


def serve() -> None:
    """Worker: build the case described on stdin's first line, then answer one JSON line per
    `train` / `infer` command until `quit` or end of input."""
    spec = json.loads(sys.stdin.readline())
    try:
        case = Case(spec)
        _send({"ready": True, **case.info()})
        for line in sys.stdin:
            op = json.loads(line)["op"]  # train | infer, with "_memory" for a step that measures memory
            if op == "quit":
                return
            _send(case.step(op.startswith("train"), memory=op.endswith("_memory")))
    except Exception as err:  # e.g. out of memory: the parent records the case as skipped
        _send({"error": f"{type(err).__name__}: {err}"})


# ---- parent side: workers, limits, interleaving -------------------------------------------------


class Skip(Exception):
    """A case stopped on purpose (time or memory limit) or by a failure; the message says why."""

    def __init__(self, reason: str, over_limit: bool = False) -> None:
        super().__init__(reason)
        self.over_limit = over_limit  # a longer L would only be further over: skip those too


class Worker:
    """A `serve` child process; every call counts against the case's own time budget."""

    def __init__(self, spec: dict[str, Any], budget_s: float, max_rss_bytes: float | None) -> None:
        self.budget_s = budget_s
        self.spent_s = 0.0
        self.max_rss_bytes = max_rss_bytes
        self._buffer = b""
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
        )
        self._started = time.monotonic()
        self._write(spec)
        self.info: dict[str, Any] = {}

    def wait_ready(self) -> dict[str, Any]:
        self.info = self._receive(self._started)  # start-up (imports, model build) counts too
        return self.info

    def call(self, op: str) -> dict[str, Any]:
        started = time.monotonic()
        self._write({"op": op})
        return self._receive(started)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._write({"op": "quit"})
                self.proc.wait(timeout=10)
            except (Skip, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            with contextlib.suppress(OSError):  # a dead worker's stdin may hold an unsent command
                stream.close()

    def _write(self, message: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as err:
            raise self._died() from err

    def _receive(self, started: float) -> dict[str, Any]:
        fd = self.proc.stdout.fileno()
        try:
            while True:
                while b"\n" in self._buffer:
                    line, self._buffer = self._buffer.split(b"\n", 1)
                    if line.startswith(MARK):
                        reply = json.loads(line[len(MARK) :])
                        if "error" in reply:
                            raise Skip(f"skipped: {reply['error']}", "memory" in reply["error"])
                        return reply
                left = self.budget_s - self.spent_s - (time.monotonic() - started)
                if left <= 0:
                    self._kill()
                    raise Skip(
                        f"skipped: over max_seconds_per_case={self.budget_s:g} s "
                        "(raise it to measure this case)",
                        over_limit=True,
                    )
                ready, _, _ = select.select([fd], [], [], min(POLL_S, left))
                if ready:
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        raise self._died()
                    self._buffer += chunk
                rss = _proc_status_kib("VmRSS", self.proc.pid)
                if self.max_rss_bytes and rss is not None and rss * 1024 > self.max_rss_bytes:
                    self._kill()
                    raise Skip(
                        f"skipped: resident memory passed max_memory_gb="
                        f"{self.max_rss_bytes / 2**30:g} (raise it to measure this case)",
                        over_limit=True,
                    )
        finally:
            self.spent_s += time.monotonic() - started

    def _kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def _died(self) -> Skip:
        code = self.proc.wait()
        self._stderr.seek(0)
        tail = self._stderr.read().decode(errors="replace").strip()[-300:]
        why = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        hint = " (likely out of memory)" if code == -9 else ""
        return Skip(f"skipped: worker {why}{hint}" + (f": {tail}" if tail else ""), over_limit=code == -9)


def _spec(cfg: DictConfig, name: str, length: int, batch: int, device: str) -> dict[str, Any]:
    return {
        "model": OmegaConf.to_container(cfg.models[name], resolve=True),
        "n_items": int(cfg.n_items),
        "d_model": int(cfg.d_model),
        "n_layers": int(cfg.n_layers),
        "length": length,
        "batch": batch,
        "device": device,
        "threads": cfg.threads,
        "seed": int(cfg.seed),
    }


def _new_case(name: str, length: int, batch: int) -> dict[str, Any]:
    return {
        "encoder": name,
        "length": length,
        "batch": batch,
        "tokens_per_step": batch * length,
        "status": "ok",
        "reason": None,
        "over_limit": False,
        "warmup": [],
        "repeats": [],
        "memory": {},
    }


def _skip(case: dict[str, Any], skip: Skip) -> None:
    case["status"], case["reason"], case["over_limit"] = "skipped", str(skip), skip.over_limit
    print(f"  {case['encoder']:6s} L={case['length']:6d}: {skip}", flush=True)


def measure_length(
    cfg: DictConfig, names: list[str], length: int, device: str, info: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Every encoder in `names` at one length: workers started together, steps interleaved."""
    batch = max(1, int(cfg.tokens_per_batch) // length)
    max_rss = None if cfg.max_memory_gb is None else float(cfg.max_memory_gb) * 2**30
    cases = {n: _new_case(n, length, batch) for n in names}
    workers: dict[str, Worker] = {}
    try:
        for n in names:
            try:
                workers[n] = Worker(
                    _spec(cfg, n, length, batch, device), float(cfg.max_seconds_per_case), max_rss
                )
            except Skip as skip:
                _skip(cases[n], skip)
        for n in list(workers):  # they start up together: waiting here costs no case budget
            try:
                info.setdefault("worker", workers[n].wait_ready())
            except Skip as skip:
                _skip(cases[n], skip)
                workers.pop(n).close()
        for n in list(workers):
            try:
                for _ in range(int(cfg.warmup)):
                    cases[n]["warmup"].append(
                        {
                            "train_s": workers[n].call("train")["seconds"],
                            "infer_s": workers[n].call("infer")["seconds"],
                        }
                    )
                _check_budget(workers[n], cases[n], int(cfg.repeats))
            except Skip as skip:
                _skip(cases[n], skip)
                workers.pop(n).close()
        for _ in range(int(cfg.repeats)):
            rows = {n: {} for n in workers}
            for op in ("train", "infer"):
                for n in list(workers):
                    try:
                        reply = workers[n].call(op)
                    except Skip as skip:
                        _skip(cases[n], skip)
                        workers.pop(n).close()
                        continue
                    rows[n] |= {f"{op}_s": reply["seconds"]}
            for n in workers:
                cases[n]["repeats"].append(rows[n])
        for n in list(workers):  # peak memory: one dedicated step per op, after the timed ones
            try:
                for op in ("train", "infer"):
                    reply = workers[n].call(f"{op}_memory")
                    cases[n]["memory"] |= {f"{op}_s": reply["seconds"], f"{op}_peak_mib": reply["peak_mib"]}
            except Skip as skip:
                _skip(cases[n], skip)
                workers.pop(n).close()
    finally:
        for w in workers.values():
            w.close()
    for case in cases.values():
        if case["status"] == "ok":
            case["median"] = medians(case["repeats"], case["tokens_per_step"], case["memory"])
            m = case["median"]
            print(
                f"  {case['encoder']:6s} L={length:6d} batch {batch:4d}: train {m['train_tok_s']:10,.0f} "
                f"tok/s, infer {m['infer_tok_s']:10,.0f} tok/s, train peak {_mib(m['train_peak_mib'])} MiB",
                flush=True,
            )
    return cases


def _check_budget(worker: Worker, case: dict[str, Any], repeats: int) -> None:
    """Skip before the repeats when the last warm-up step says they cannot fit in the budget."""
    if not case["warmup"]:
        return
    last = case["warmup"][-1]
    estimate = (repeats + 1) * (last["train_s"] + last["infer_s"])  # + the memory steps
    left = worker.budget_s - worker.spent_s
    if estimate > left:
        raise Skip(
            f"skipped: {repeats} repeats estimated at {estimate:.0f} s from the warm-up, "
            f"{left:.0f} s left of max_seconds_per_case={worker.budget_s:g}",
            over_limit=True,
        )


def medians(repeats: list[dict[str, Any]], tokens: int, memory: dict[str, Any]) -> dict[str, Any]:
    """Median times over the timed repeats; peaks from the memory steps."""
    train_s = statistics.median(r["train_s"] for r in repeats)
    infer_s = statistics.median(r["infer_s"] for r in repeats)
    return {
        "train_s": train_s,
        "infer_s": infer_s,
        "train_tok_s": tokens / train_s,
        "infer_tok_s": tokens / infer_s,
        "train_peak_mib": memory.get("train_peak_mib"),
        "infer_peak_mib": memory.get("infer_peak_mib"),
    }


# ---- analysis --------------------------------------------------------------------------------------


def growth_exponent(lengths: Sequence[float], values: Sequence[float | None]) -> float | None:
    """Least-squares slope of log(value) against log(L), i.e. k in value ~ L^k; None under 2 lengths."""
    points = [(float(x), float(v)) for x, v in zip(lengths, values, strict=True) if v is not None and v > 0]
    if len({x for x, _ in points}) < 2:
        return None
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def crossover(lengths: Sequence[float], ratios: Sequence[float]) -> dict[str, Any]:
    """The length from which ratio (first / second encoder's tokens/s) stays >= 1, interpolated
    linearly in log L against log ratio between the last length below 1 and the next."""
    pairs = sorted((float(x), float(r)) for x, r in zip(lengths, ratios, strict=True))
    if not pairs:
        return {"length": None, "note": "not measured"}
    first_ahead = len(pairs)
    while first_ahead > 0 and pairs[first_ahead - 1][1] >= 1:
        first_ahead -= 1
    if first_ahead == len(pairs):
        return {"length": None, "note": f"not reached up to L={pairs[-1][0]:g}"}
    if first_ahead == 0:
        return {"length": None, "note": f"below {pairs[0][0]:g}"}
    (x0, r0), (x1, r1) = pairs[first_ahead - 1], pairs[first_ahead]
    lx0, lx1, ly0, ly1 = np.log(x0), np.log(x1), np.log(r0), np.log(r1)
    at = float(np.exp(lx0 - ly0 * (lx1 - lx0) / (ly1 - ly0))) if ly1 != ly0 else x1
    return {"length": at, "note": f"between L={x0:g} and L={x1:g} (interpolated in log L)"}


def _ok(cases: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    ok = (c for c in cases if c["encoder"] == name and c["status"] == "ok")
    return sorted(ok, key=lambda c: c["length"])


def fits(cases: list[dict[str, Any]], names: list[str], fit_range: Sequence[float]) -> dict[str, Any]:
    """Growth exponents of each encoder's per-sequence cost over the lengths in fit_range."""
    low, high = fit_range
    out = {}
    for name in names:
        used = [c for c in _ok(cases, name) if low <= c["length"] <= high]
        lengths = [c["length"] for c in used]
        out[name] = {"lengths": lengths}
        for key in ("train_s", "infer_s", "train_peak_mib", "infer_peak_mib"):
            per_sequence = [None if c["median"][key] is None else c["median"][key] / c["batch"] for c in used]
            out[name][f"{key}_exponent"] = growth_exponent(lengths, per_sequence)
    return out


def _paired(a: dict[str, Any], b: dict[str, Any], op: str) -> dict[str, float] | None:
    """The median and quartiles of the per-repeat ratio b_s / a_s (a's tokens/s over b's): each repeat
    timed the two back to back, so a slow spell of the machine falls on both and cancels in the ratio,
    which a ratio of the two medians does not do."""
    # a skipped case may have ended early: zip stops at the shorter
    repeats = list(zip(a.get("repeats", ()), b.get("repeats", ()), strict=False))
    return paired_ratio([ra[f"{op}_s"] for ra, _ in repeats], [rb[f"{op}_s"] for _, rb in repeats])


def ratios(cases: list[dict[str, Any]], first: str, second: str) -> list[dict[str, Any]]:
    """first / second tokens/s, training and inference, at every length both measured: the ratio of the
    medians ("train", "infer") and the paired per-repeat ratio ("train_paired", "infer_paired")."""
    a = {c["length"]: c for c in _ok(cases, first)}
    b = {c["length"]: c for c in _ok(cases, second)}
    return [
        {
            "length": length,
            "train": a[length]["median"]["train_tok_s"] / b[length]["median"]["train_tok_s"],
            "infer": a[length]["median"]["infer_tok_s"] / b[length]["median"]["infer_tok_s"],
            "train_paired": _paired(a[length], b[length], "train"),
            "infer_paired": _paired(a[length], b[length], "infer"),
        }
        for length in sorted(a.keys() & b.keys())
    ]


def _ratio_at(result: dict[str, Any], length: int, op: str) -> float | None:
    return next((r[op] for r in result["ratios"] if r["length"] == length), None)


def _goal_ratio(result: dict[str, Any], length: int) -> float | None:
    """The paired training ratio where the repeats were recorded, else the ratio of the medians."""
    paired = _ratio_at(result, length, "train_paired")
    return paired["median"] if paired else _ratio_at(result, length, "train")


def _goal(value: float | None, target: float, at_least: bool) -> dict[str, Any]:
    if value is None:
        return {"value": None, "target": f"{'>=' if at_least else '<='} {target:g}", "status": "not measured"}
    met = value >= target if at_least else value <= target
    return {
        "value": value,
        "target": f"{'>=' if at_least else '<='} {target:g}",
        "status": "met" if met else "not met",
    }


def goals(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets: mamba training tokens/s >= sasrec's at L=200 and >= 3x at L=4,000 (the
    paired ratio); mamba's peak training memory per sequence growing with exponent <= 1.1."""
    paired = result["pair"] == ["mamba", "sasrec"]
    out = {
        key: _goal(_goal_ratio(result, length) if paired else None, target, True)
        for key, (length, target) in GOALS.items()
    }
    exponent = result["fits"].get("mamba", {}).get("train_peak_mib_exponent")
    out["mamba_memory_exponent"] = _goal(exponent, MEMORY_EXPONENT_GOAL, False)
    return out


# ---- config, run, report ---------------------------------------------------------------------------


def _encoders(cfg: DictConfig) -> None:
    names = list(cfg.encoders) if isinstance(cfg.encoders, ListConfig) else None
    if not names or len(set(names)) != len(names) or any(n not in cfg.models for n in names):
        raise RecsysError(
            f"bench encoders: encoders must be a non-empty list of distinct names from "
            f"{sorted(cfg.models)}, got {cfg.encoders}; e.g. encoders=[mamba,sasrec]"
        )


# What device= may be on this machine: cuda only where there is a CUDA device.
DEVICES = ("auto", "cpu", "cuda") if torch.cuda.is_available() else ("auto", "cpu")


def _device(cfg: DictConfig) -> None:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RecsysError("bench encoders: device=cuda but no CUDA device is available; use device=auto")


def _models_build(cfg: DictConfig) -> None:
    """A model config the encoder rejects fails here, before any worker starts."""
    for name in cfg.encoders:
        conf = OmegaConf.to_container(cfg.models[name], resolve=True)
        try:
            build_model(conf, int(cfg.n_items), int(cfg.d_model), int(cfg.n_layers), min(cfg.lengths))
        except RecsysError as err:
            raise RecsysError(
                f"bench encoders: models.{name} (with d_model={cfg.d_model}, n_layers={cfg.n_layers}): {err}"
            ) from err
        except TypeError as err:
            raise RecsysError(
                f"bench encoders: models.{name} does not build: {err}; check "
                f"conf/model/{name}.yaml and the models.{name}.* overrides"
            ) from err


# Every value of conf/bench_encoders.yaml, before any worker starts.
BENCH_ENCODERS = Schema(
    Rule("repeats", Int(1, 10_000, example=5)),
    Rule("warmup", Int(0, 1_000, example=2)),
    Rule("tokens_per_batch", Int(1, 1 << 24, example=8192)),
    Rule("d_model", Int(1, 1 << 14, example=64)),
    Rule("n_layers", Int(1, 256, example=2)),
    Rule("n_items", Int(1, 1 << 26, example=3416)),
    # Validation builds every model (below): refuse sizes that could not be allocated first.
    Relation(
        ("n_items", "d_model"),
        lambda n, d: n * d <= 1 << 30,
        "{k0}={v0} x {k1}={v1} would make a 4 GiB item table or more; use smaller sizes",
    ),
    # Every encoder is built at the one d_model: attention splits it across its heads.
    Relation(
        ("d_model", "models.sasrec.n_heads"),
        lambda d, h: not (is_int(d) and is_int(h) and h > 0) or d % h == 0,
        "{k0}={v0} must be a multiple of {k1}={v1} (attention splits d_model across its heads)",
        present_only=True,
    ),
    Rule("seed", Seed()),
    Check(_encoders),
    Rule("lengths", IntList(1, example="[50,200,1000]")),
    Rule("fit_range", NumList(above=0, length=2, example="[1000,16000]")),
    Relation(("fit_range",), lambda fr: fr[0] < fr[1], "{k0}={v0} must be [low, high] with low < high"),
    Check(_device),  # first: on a machine without CUDA, device=cuda gets this message, not the list
    Rule("device", Choice(DEVICES)),
    Rule("threads", Int(1, optional=True)),
    Rule("max_seconds_per_case", Num(above=0, example=600)),
    Rule("max_memory_gb", Num(above=0, optional=True, example=12)),
    Check(_models_build),
)


def check_config(cfg: DictConfig) -> None:
    """Raise RecsysError naming the key and the fix for any value the benchmark cannot run with."""
    try:
        BENCH_ENCODERS.validate(cfg)
    except RecsysError as err:
        message = str(err).removeprefix("bench encoders: ")
        raise RecsysError(f"bench encoders: {message}") from None


def benchmark(cfg: DictConfig) -> dict[str, Any]:
    check_config(cfg)
    started = time.perf_counter()
    names = list(cfg.encoders)
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    info: dict[str, Any] = {}
    result: dict[str, Any] = {
        "benchmark": "encoders",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine(), "device": device, "load_average_1m_at_start": round(os.getloadavg()[0], 2)},
        "method": {
            "batch": f"max(1, {cfg.tokens_per_batch} // L) full-length sequences of random item ids",
            "train_step": "forward in train mode + loss mean(hidden^2) + backward through all parameters; "
            "no optimiser step, no scoring head",
            "infer_step": "encode under no_grad, eval mode",
            "order": "one worker process per (encoder, L); per repeat every encoder's training step in turn, "
            "then every encoder's inference step; medians over repeats after warm-up; peak "
            "memory from one more step per op after the repeats (untimed in the medians)",
            "exponents": "least-squares slope of log(cost / batch) against log L over L in "
            f"{list(cfg.fit_range)}",
        },
        "config": OmegaConf.to_container(cfg, resolve=True),
        "cases": [],
    }
    lost: dict[str, str] = {}  # encoder -> why it stopped; longer lengths would only fare worse
    for length in sorted(set(cfg.lengths)):
        for n, why in lost.items():
            case = _new_case(n, length, max(1, int(cfg.tokens_per_batch) // length))
            _skip(case, Skip(f"skipped: {why}", over_limit=True))
            result["cases"].append(case)
        todo = [n for n in names if n not in lost]
        if todo:
            cases = measure_length(cfg, todo, length, device, info)
            result["cases"] += [cases[n] for n in todo]
            for n, case in cases.items():
                if case["over_limit"]:
                    lost[n] = f"over a limit at the shorter L={length}"
    worker = info.get("worker", {})
    result["machine"] |= {
        "torch_threads": worker.get("torch_threads"),
        "numba_threads": worker.get("numba_threads"),
        "device_name": worker.get("device_name"),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
    }
    result["method"]["peak_memory"] = MEMORY_METHODS[worker.get("memory_method", "unavailable")]
    result["pair"] = names[:2] if len(names) >= 2 else None
    result["ratios"] = ratios(result["cases"], *names[:2]) if len(names) >= 2 else []
    result["fits"] = fits(result["cases"], names, list(cfg.fit_range))
    result["crossover"] = (
        {
            op: crossover([r["length"] for r in result["ratios"]], [r[op] for r in result["ratios"]])
            for op in ("train", "infer")
        }
        if result["pair"]
        else {}
    )
    result["goals"] = goals(result)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def markdown_table(result: dict[str, Any]) -> str:
    names = list(result["config"]["encoders"])
    pair = result["pair"]
    by = {(c["encoder"], c["length"]): c for c in result["cases"]}
    lengths = sorted({c["length"] for c in result["cases"]})

    def cell(name: str, length: int, key: str, fmt: str) -> str:
        c = by.get((name, length))
        if c is None or c["status"] != "ok":
            return "skipped"
        v = c["median"][key]
        return "-" if v is None else format(v, fmt)

    ratio_head = [f"{pair[0]}/{pair[1]}"] if pair else []
    head = (
        ["L", "batch"]
        + [f"train tok/s {n}" for n in names]
        + ratio_head
        + [f"infer tok/s {n}" for n in names]
        + ratio_head
        + [f"train peak MiB {n}" for n in names]
        + [f"infer peak MiB {n}" for n in names]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for length in lengths:
        batch = next(c["batch"] for c in result["cases"] if c["length"] == length)
        row = [f"{length:,}", str(batch)]
        for op in ("train", "infer"):
            row += [cell(n, length, f"{op}_tok_s", ",.0f") for n in names]
            if pair:
                r = _ratio_at(result, length, op)
                row.append("-" if r is None else f"{r:.2f}x")
        for op in ("train", "infer"):
            row += [cell(n, length, f"{op}_peak_mib", ",.1f") for n in names]
        lines.append("| " + " | ".join(row) + " |")
    for c in result["cases"]:
        if c["status"] != "ok":
            lines.append(f"- {c['encoder']} L={c['length']:,}: {c['reason']}")
    return "\n".join(lines)


def summary(result: dict[str, Any]) -> str:
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    low, high = result["config"]["fit_range"]
    lines = [f"growth exponents per sequence over L in [{low:g}, {high:g}] (1 = linear in L):"]
    for name, f in result["fits"].items():
        lines.append(
            f"  {name}: train time {num(f['train_s_exponent'])}, "
            f"infer time {num(f['infer_s_exponent'])}, "
            f"train peak memory {num(f['train_peak_mib_exponent'])}, "
            f"infer peak memory {num(f['infer_peak_mib_exponent'])} (lengths {f['lengths']})"
        )
    for r in result["ratios"]:
        for op in ("train", "infer"):
            p = r[f"{op}_paired"]
            if p:
                first, second = result["pair"]
                lines.append(
                    f"L={r['length']:,} {op}: {first}/{second} paired over {p['n']} repeats "
                    f"{p['median']:.2f}x (quartiles {p['q1']:.2f}-{p['q3']:.2f}), "
                    f"ratio of medians {r[op]:.2f}x"
                )
    for op, cross in result["crossover"].items():
        at = "" if cross["length"] is None else f"L ~ {cross['length']:,.0f}, "
        first, second = result["pair"]
        lines.append(f"{first} {op} tokens/s overtakes {second}'s: {at}{cross['note']}")
    for key, g in result["goals"].items():
        lines.append(f"goal {key} {g['target']}: {g['status']} ({num(g['value'])})")
    lines.append(f"wall time {result['wall_s']:.0f} s")
    return "\n".join(lines)


def save_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    panels = [
        ("train_tok_s", "training tokens/s"),
        ("infer_tok_s", "inference tokens/s"),
        ("train_peak_mib", "training peak MiB per step"),
    ]
    lengths = sorted({c["length"] for c in result["cases"]})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for name in result["config"]["encoders"]:
            pts = [
                (c["length"], c["median"][key])
                for c in _ok(result["cases"], name)
                if c["median"][key] is not None and c["median"][key] > 0
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(lengths, [f"{x:,}" for x in lengths])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("sequence length L")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:  # every case may have been skipped
            ax.legend()
    m = result["machine"]
    fig.suptitle(
        f"encoders against L: {m['device_name'] or m['device']}, {m['torch_threads']} threads, "
        f"{result['date']}"
    )
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), hint="pass another out_dir=")
    finally:
        plt.close(fig)


def write_json(result: dict[str, Any], path: Path) -> None:
    write_result(path, result)


@hydra_entry("bench_encoders")
def main(cfg: DictConfig) -> dict[str, Any]:
    result = benchmark(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_plot(result, out / "bench_encoders.png")
    write_json(result, out / "bench_encoders.json")
    print(markdown_table(result))
    print(summary(result))
    print(f"results: {out / 'bench_encoders.json'}, plot: {out / 'bench_encoders.png'}")
    return result
