"""Property-based fuzzing of every entry point's Hydra overrides that take a number or a path.

Random values (negative, zero, huge, NaN, inf, fractions, booleans, null, strings, lists, missing or
misplaced paths, paths with spaces and unicode) are given as command-line override text, parsed by
Hydra's own override parser, and checked by the entry point's validation function in-process: a bad
value must raise `RecsysError` naming the key, a good one must pass, and which is which must agree
with the rule written down here for that key. Validation must do no expensive work: preparing data,
loading or scoring a checkpoint would trip a wire. A few real `python -m ...` runs check that a bad
value exits with status 2 and one `error:` line, without a traceback.
`RECSYS_FUZZ_EXAMPLES=N` runs N examples per entry point.
"""

from __future__ import annotations

import atexit
import copy
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import DictConfig, ListConfig, OmegaConf

from recsys_mamba.config import compose
from recsys_mamba.errors import RecsysError
from tests.helpers import fuzz_settings

REPO = Path(__file__).resolve().parents[1]
FIXTURE_LOG = REPO / "tests" / "data" / "fixtures" / "events.csv"


# ---- a pool of paths: files, folders, missing ones, ones under a file, spaces and unicode ---------

POOL = Path(tempfile.mkdtemp(prefix="fuzz-overrides-"))
atexit.register(shutil.rmtree, POOL, True)
(POOL / "dir with space").mkdir()
(POOL / "prepared").mkdir()
(POOL / "prepared" / "manifest.json").write_text("{}")
shutil.copy(FIXTURE_LOG, POOL / "events.csv")
for name in ("run.ckpt", "dir with space/ünï côde.ckpt"):
    (POOL / name).write_bytes(b"not read by validation")
PATHS = [
    str(POOL / "events.csv"),
    str(POOL / "run.ckpt"),
    str(POOL / "dir with space" / "ünï côde.ckpt"),
    str(POOL / "dir with space"),
    str(POOL / "prepared"),
    str(POOL / "missing" / "x.ckpt"),
    str(POOL / "events.csv" / "under a file"),
    str(POOL / "new out ü"),
    "no/such/relative/thing",
    "",
    "   ",
]

# ---- values and their override text --------------------------------------------------------------

TEXT = st.text(st.sampled_from("abc xyz-_./:é ü0123456789"), max_size=10)
NUMBERS = st.one_of(
    st.integers(-3, 3),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2, 7, 64, 200, 4096, 2**20, 2**24, 2**32 - 1, 2**32, 2**63, 10**10]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, 0.999, 1e-9, 1e3, 3.0, -0.5, float("nan"), float("inf"), -float("inf")]),
)
SCALARS = st.one_of(
    NUMBERS, st.booleans(), st.none(), TEXT, st.sampled_from(["12", "1e3", "nan", "true", "null"])
)
PATH_VALUES = st.one_of(st.sampled_from(PATHS), st.sampled_from(PATHS), SCALARS)
LISTS = st.one_of(
    st.lists(st.integers(-2, 40), max_size=3), st.lists(st.sampled_from(PATHS), max_size=2), SCALARS
)


def override_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else ("inf" if value > 0 else "-inf")
            if math.isinf(value)
            else repr(value)
        )
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ",".join(override_text(v) for v in value) + "]"
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


PARSER = OverridesParser.create()


def parsed(key: str, value: Any) -> Any:
    got = PARSER.parse_overrides([f"{key}={override_text(value)}"])[0].value()
    return list(got) if isinstance(got, list | ListConfig) else got


# ---- rules: what each key accepts ----------------------------------------------------------------


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return (is_int(v) or isinstance(v, float)) and not isinstance(v, bool) and math.isfinite(v)


def ints(lo: int | None = None, hi: int | None = None) -> Callable[[Any], bool]:
    return lambda v: is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)


def nums(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    def ok(v: Any) -> bool:
        if not is_num(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return hi is None or not (v >= hi if hi_open else v > hi)

    return ok


def optional(rule: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or rule(v)


def boolean(v: Any) -> bool:
    return isinstance(v, bool)


def seed(v: Any) -> bool:
    return ints(0, 2**32 - 1)(v)


def path_text(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def is_file(v: Any) -> bool:
    return path_text(v) and Path(v).is_file()


def exists(v: Any) -> bool:
    return path_text(v) and Path(v).exists()


def out_dir(v: Any) -> bool:
    if not path_text(v):
        return False
    probe = Path(v).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def out_file(v: Any) -> bool:
    return path_text(v) and not Path(v).is_dir() and out_dir(str(Path(v).absolute().parent))


def prepared(v: Any) -> bool:
    return v is None or (path_text(v) and (Path(v) / "manifest.json").is_file())


def shard(v: Any) -> bool:
    import re

    m = re.fullmatch(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*", v) if isinstance(v, str) else None
    return bool(m) and 0 <= int(m[1]) < int(m[2]) <= 2**32


def one_char(v: Any) -> bool:
    return v is None or (isinstance(v, str) and len(v.encode()) == 1)


def data_name(v: Any) -> bool:
    return path_text(v) and "/" not in v and "\\" not in v and v not in (".", "..")


@dataclass(frozen=True)
class Key:
    key: str
    rule: Callable[[Any], bool]
    values: st.SearchStrategy = SCALARS
    base: tuple[str, ...] = ()  # extra overrides this key needs (e.g. data=events)


PATH = PATH_VALUES
EVENTS = ("data=events", f"data.path={FIXTURE_LOG}")

TRAIN = [
    Key("model.max_len", ints(1, 2**24)),
    Key("datamodule.max_len", ints(1, 200)),  # never beyond model.max_len (200)
    Key("datamodule.batch_size", ints(1, 2**24)),
    Key("datamodule.eval_batch_size", ints(1, 2**24)),
    Key("datamodule.num_workers", ints(0, 1024)),
    Key("datamodule.next_item_windows", boolean),
    Key("datamodule.bucket_by_length", boolean),
    Key("model.d_model", ints(1, 2**20)),
    Key("model.d_state", ints(1, 2**20)),
    Key("model.d_conv", ints(2, 2**20)),
    Key("model.n_layers", ints(1, 2**20)),
    Key("model.expand", ints(1, 2**20)),
    Key("model.dropout", nums(0, 1, hi_open=True)),
    Key("model.dt_min", nums(0, 0.1, lo_open=True)),
    Key("model.d_model", lambda v: ints(1, 2**20)(v) and v % 2 == 0, base=("model=sasrec",)),
    Key("model.n_heads", lambda v: ints(1, 2**20)(v) and 64 % v == 0, base=("model=sasrec",)),
    Key("head.n_negatives", ints(1, 2**20)),
    Key("head.seen_bias", boolean),
    Key("head.dropout", nums(0, 1, hi_open=True), base=("task=ctr",)),
    Key(
        "head.mlp_dims",
        lambda v: isinstance(v, list) and all(ints(1, 2**20)(x) for x in v),
        LISTS,
        ("task=ctr",),
    ),
    Key("trainer.max_epochs", lambda v: ints(-1)(v) and v != 0),
    Key("trainer.min_epochs", optional(ints(0))),
    Key("trainer.gradient_clip_val", optional(nums(0))),
    Key("trainer.limit_train_batches", lambda v: v is None or ints(0)(v) or nums(0, 1)(v)),
    Key("trainer.log_every_n_steps", optional(ints(1))),
    Key("trainer.num_sanity_val_steps", ints(-1)),
    Key(
        "trainer.precision", lambda v: str(v) in ("32", "32-true", "bf16-mixed", "bf16-true", "64", "64-true")
    ),
    Key("module.optimizer.lr", nums(0, lo_open=True)),
    Key("module.optimizer.weight_decay", nums(0)),
    Key("module.scheduler.warmup_frac", nums(0, 1)),
    Key("seed", seed),
    Key("ckpt_path", lambda v: v in (None, "") or is_file(v), PATH),
    Key("data.path", is_file, PATH, EVENTS),
    Key("paths.cache_dir", out_dir, PATH),
    Key("datamodule.prepared_dir", prepared, PATH),
    Key("data.filter.min_user", ints(0)),
    Key("data.split.min_events", ints(0)),
    Key("data.ctr.negatives", ints(0, 10_000)),
    Key("data.ctr.rating_threshold", nums()),
    Key("data.synthetic.n_users", ints(1, 10**9)),
    Key("data.synthetic.drift", nums(0, 1)),
]
PREPARE = [
    Key("out_dir", lambda v: v is None or path_text(v), PATH),
    Key("paths.cache_dir", path_text, PATH),
    Key("overwrite", boolean),
    Key("data.path", is_file, PATH, ("data=events",)),
    Key(
        "data.separator",
        one_char,
        st.one_of(SCALARS, st.sampled_from([",", ";", "\t", "::", "é", "ab"])),
        EVENTS,
    ),
    Key("data.name", data_name, st.one_of(SCALARS, st.sampled_from(["a/b", "..", "ok name", "ü"]))),
    Key("data.filter.min_item", ints(0)),
    Key("data.time_window.start", optional(ints())),
    Key("data.split.test_time", optional(ints()), base=EVENTS),
    Key("data.synthetic.seed", seed),
    Key(
        "engine",
        lambda v: v in ("local", "ray") and not isinstance(v, bool),
        st.one_of(SCALARS, st.sampled_from(["local", "ray", "dask", "Ray"])),
    ),
    Key("buckets", optional(ints(1, 1 << 20))),
    Key("bucket_events", ints(1)),
    Key("data.synthetic.p_current_interest", nums(0, 0.75)),  # plus p_other_tastes (0.25) <= 1
    Key("data.synthetic.max_events", ints(12, 10**6)),  # >= min_events (12)
    Key("data.synthetic.mean_events", nums(0, 10**6, lo_open=True)),
    Key("data.ctr.seed", seed),
]
EVALUATE = [
    Key("ckpt_path", is_file, PATH),
    Key("out_dir", out_dir, PATH),
    Key("compare", lambda v: v is None or (isinstance(v, list) and all(is_file(x) for x in v)), LISTS),
    Key("seed", seed),
    Key("n_bootstrap", ints(1, 10**6)),
    Key("n_bins", ints(1, 10**4)),
]
SCORE = [
    Key("ckpt_path", is_file, PATH),
    Key("input", exists, PATH),
    Key("output", out_dir, PATH),
    Key("prepared", prepared, PATH),
    Key("history", lambda v: v is None or exists(v), PATH),
    Key("state_in", lambda v: v is None or is_file(v), PATH),
    Key("state_out", lambda v: v is None or out_file(v), PATH),
    Key("top_k", ints(1, 2**20)),
    Key("chunk_size", ints(1, 2**24)),
    Key("max_len", optional(ints(1, 2**24))),
    Key("exclude_seen", boolean),
    Key("progress", boolean),
    Key("pause_s", nums(0, 3600)),
    Key(
        "shard",
        shard,
        st.one_of(SCALARS, st.sampled_from(["0/1", "1/4", "3/2", "0/0", " 1 / 2 ", "٣/٤", "0/1e3"])),
    ),
    Key(
        "mode",
        lambda v: v in ("topk", "candidates", "stream") and not isinstance(v, bool),
        st.one_of(SCALARS, st.sampled_from(["topk", "stream", "candidates", "all"])),
    ),
]
BENCH_PIPELINE = [
    Key("repeats", ints(1, 100)),
    Key("big.n_events", ints(1, 10**10)),
    Key("big.n_users", ints(1, 10**9)),
    Key("big.n_items", ints(1, 10**9)),
    Key("big.seed", seed),
    Key("big.chunk", ints(1, 10**9)),
    Key("work_dir", out_dir, PATH),
    Key("out_file", out_file, PATH),
    Key("ml1m", boolean),
]
BENCH_SCALE = [
    Key(
        "sections",
        lambda v: v == ["prepare"],
        st.one_of(LISTS, st.sampled_from([["prepare"], ["prepare", "prepare"], ["training"], []])),
    ),
    Key(
        "prepare.sizes",
        lambda v: isinstance(v, list) and bool(v) and all(ints(1, 10**11)(x) for x in v),
        LISTS,
    ),
    Key("prepare.events_per_user", ints(1)),
    Key("prepare.n_items", ints(1, 10**9)),
    Key("prepare.seed", seed),
    Key("prepare.chunk", ints(1, 10**9)),
    Key("prepare.keep_logs", boolean),
    Key("prepare.goals.peak_rss_gb", nums(0, lo_open=True)),
    Key("prepare.goals.events_per_s", nums(0, lo_open=True)),
    Key("work_dir", out_dir, PATH),
    Key("out_file", out_file, PATH),
    Key("keep_work", boolean),
]
BENCH_SCAN = [
    Key("dim", ints(1, 2**16)),
    Key("repeats", ints(1, 1000)),
    Key("ref_max_batch", ints(1)),
    Key("ref_max_length", ints(1)),
    Key("threads", optional(ints(1, 4096))),
    Key("seed", seed),
    Key("d_states", lambda v: isinstance(v, list) and bool(v) and all(ints(1, 1024)(x) for x in v), LISTS),
    Key("output_json", out_file, PATH),
]
BENCH_SCORE = [
    Key("k", ints(1, 3416)),  # at most stream.n_items
    Key("topk.max_len", ints(1, 2**20)),
    Key("topk.batch_size", ints(1, 2**20)),
    Key("topk.max_users", optional(ints(1))),
    Key("topk.repeats", ints(1, 1000)),
    Key("stream.n_items", ints(10, 2**26)),  # at least k (10)
    Key("stream.step_repeats", ints(1, 100_000)),
    Key(
        "stream.histories",
        lambda v: isinstance(v, list) and bool(v) and all(ints(1, 2**24)(x) for x in v),
        LISTS,
    ),
    Key("threads", optional(ints(1, 4096))),
    Key("models.mamba.d_model", ints(1, 2**20)),
    Key("models.sasrec.d_model", lambda v: ints(1, 2**20)(v) and v % 2 == 0),
    Key("output_json", out_file, PATH),
]


def is_folder(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip()) and Path(v).is_dir()


BENCH_STATE = [
    Key("d_states", lambda v: isinstance(v, list) and bool(v) and all(ints(1, 1024)(x) for x in v), LISTS),
    Key("seed", seed),
    Key("threads", optional(ints(1, 1024))),
    Key("batch_size", ints(1, 2**16)),
    Key("length", ints(1, 2**20)),
    Key("repeats", ints(1, 1000)),
    Key("n_items", ints(1, 2**26)),
    Key("output_json", out_file, PATH),
]
BENCH_ACCURACY = [
    Key("runs", lambda v: isinstance(v, list) and bool(v) and all(is_folder(x) for x in v), LISTS),
    Key("output_json", out_file, PATH),
]


def _validator(name: str) -> Callable[[DictConfig], None]:
    if name == "train":
        from recsys_mamba.training.run import validate_config
    elif name == "prepare":
        from recsys_mamba.prepare import validate_config
    elif name == "evaluate":
        from recsys_mamba.evaluation.report import validate_config
    elif name == "score":
        from recsys_mamba.scoring.job import validate_config
    else:
        import importlib

        validate_config = importlib.import_module(
            f"recsys_mamba.bench.{name.removeprefix('bench_')}"
        ).validate_config
    return validate_config


BASES = {
    "train": [f"paths.cache_dir={POOL / 'cache'}"],
    "prepare": [],
    "evaluate": [f"ckpt_path={POOL / 'run.ckpt'}", f"out_dir={POOL / 'eval'}"],
    "score": [f"ckpt_path={POOL / 'run.ckpt'}", f"input={POOL / 'events.csv'}", f"output={POOL / 'scores'}"],
    "bench_pipeline": [f"work_dir={POOL / 'work'}", f"out_file={POOL / 'bench.json'}"],
    "bench_scale": [f"work_dir={POOL / 'scale'}", f"out_file={POOL / 'scale.json'}"],
    "bench_scan": [f"output_json={POOL / 'scan.json'}"],
    "bench_score": [f"output_json={POOL / 'score.json'}"],
    "bench_state": [f"output_json={POOL / 'state.json'}"],
    "bench_accuracy": [f"runs=[{POOL / 'prepared'}]", f"output_json={POOL / 'accuracy.json'}"],
}
KEYS = {
    "train": TRAIN,
    "prepare": PREPARE,
    "evaluate": EVALUATE,
    "score": SCORE,
    "bench_pipeline": BENCH_PIPELINE,
    "bench_scale": BENCH_SCALE,
    "bench_scan": BENCH_SCAN,
    "bench_score": BENCH_SCORE,
    "bench_state": BENCH_STATE,
    "bench_accuracy": BENCH_ACCURACY,
}
_COMPOSED: dict[tuple[str, tuple[str, ...]], DictConfig] = {}


def base_config(name: str, extra: tuple[str, ...]) -> DictConfig:
    """The composed config (cached: composing takes ~50 ms) with `paths.output_dir` set."""
    if (name, extra) not in _COMPOSED:
        overrides = [f"paths.output_dir={POOL / 'out'}", *BASES[name], *extra]
        _COMPOSED[(name, extra)] = compose(name, overrides)
    return copy.deepcopy(_COMPOSED[(name, extra)])


def tripwires() -> ExitStack:
    """Patch the expensive steps to fail loudly: validation must never reach them."""

    def tripped(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("validation did expensive work (prepare / load / score)")

    stack = ExitStack()
    for target in (
        "recsys_mamba.data.pipeline._run",
        "recsys_mamba.data.synthetic.generate",
        "recsys_mamba.scoring.model.read_checkpoint",
        "recsys_mamba.evaluation.scoring.score",
        "torch.load",
    ):
        stack.enter_context(mock.patch(target, tripped))
    return stack


def check_override(name: str, case: Key, value: Any, real_compose: bool) -> str:
    value = parsed(case.key, value)  # what Hydra makes of the text on a command line
    if real_compose:
        overrides = [f"paths.output_dir={POOL / 'out'}", *BASES[name], *case.base]
        cfg = compose(name, [*overrides, f"{case.key}={override_text(value)}"])
    else:
        cfg = base_config(name, case.base)
        OmegaConf.update(cfg, case.key, value, force_add=True)
    want_ok = case.rule(value)
    with tripwires():
        try:
            _validator(name)(cfg)
        except RecsysError as err:
            msg = str(err)
            assert case.key.split(".")[-1].split("[")[0] in msg, (case.key, value, msg)
            assert "\n" not in msg and "Traceback" not in msg, msg
            assert not want_ok, f"{case.key}={value!r} is valid but was refused: {msg}"
            return "refused"
    assert want_ok, f"{case.key}={value!r} is invalid but was accepted"
    return "accepted"


@pytest.mark.parametrize("name", list(KEYS))
def test_overrides_are_validated_before_any_work(name: str, reliability) -> None:
    keys = KEYS[name]

    @fuzz_settings(default=max(30, 2 * len(keys)))
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        case = data.draw(st.sampled_from(keys), label="key")
        value = data.draw(case.values, label="value")
        real = data.draw(st.integers(0, 9), label="compose") == 0  # now and then the full Hydra path
        reliability.fuzz(f"overrides/{name}")
        check_override(name, case, value, real)

    check()


def test_default_configs_pass_validation() -> None:
    for name in KEYS:
        with tripwires():
            _validator(name)(base_config(name, ()))


# ---- real command lines --------------------------------------------------------------------------

# one per kind of process start: train and score import torch (~10 s each on a busy core), prepare not
COMMANDS = [
    (["recsys_mamba.train", "module.optimizer.lr=nan"], "module.optimizer.lr"),
    (["recsys_mamba.prepare", "data=events", "data.path=123"], "data.path"),
    (
        ["recsys_mamba.score", f"ckpt_path={POOL / 'run.ckpt'}", f"input={POOL}", "output=x", "shard=3/2"],
        "shard",
    ),
]
MORE_COMMANDS = [
    (["recsys_mamba.train", "model.d_model=0", "trainer=cpu"], "model.d_model"),
    (["recsys_mamba.train", "ckpt_path='/no where/ünï côde.ckpt'"], "ckpt_path"),
    (["recsys_mamba.prepare", "overwrite=maybe"], "overwrite"),
    (["recsys_mamba.evaluate", f"ckpt_path={POOL / 'run.ckpt'}", "n_bins=inf"], "n_bins"),
    (
        ["recsys_mamba.score", f"ckpt_path={POOL / 'run.ckpt'}", f"input={POOL}", "output=x", "top_k=1.5"],
        "top_k",
    ),
    (["recsys_mamba.bench", "scan", "dim=-1"], "dim"),
    (["recsys_mamba.bench", "pipeline", "big.n_events=0"], "big.n_events"),
    (["recsys_mamba.bench", "score", "k=nan"], "k"),
]


def run_commands(commands: list[tuple[list[str], str]], tmp_path: Path, reliability) -> None:
    """Start them all, then check each: exit status 2, one `error:` line naming the key, no traceback,
    and nothing prepared."""
    env = {**os.environ, "RECSYS_DATA_DIR": str(tmp_path / "data")}
    procs = []
    for i, (args, _) in enumerate(commands):
        cmd = [sys.executable, "-m", *args, f"hydra.run.dir={tmp_path / f'run{i}'}"]
        procs.append(
            subprocess.Popen(
                cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    for proc, (args, key) in zip(procs, commands, strict=True):
        _, err = proc.communicate(timeout=240)
        reliability.fuzz("overrides/command-line")
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2, (args, err[-2000:])
        assert len(errors) == 1 and key in errors[0], (args, err[-2000:])
        assert "Traceback" not in err, err[-2000:]
    cache = tmp_path / "data" / "cache"
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.timeout(300)
def test_command_lines_exit_2_with_one_error_line(tmp_path: Path, reliability) -> None:
    run_commands(COMMANDS, tmp_path, reliability)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_more_command_lines_exit_2_with_one_error_line(tmp_path: Path, reliability) -> None:
    run_commands(MORE_COMMANDS, tmp_path, reliability)
