"""Property-based fuzzing of the readers and the `prepare` pipeline (hypothesis).

Valid random logs, written in every supported input format, must come out with the output
contract's invariants: every kept event once, per-user chronological order (ties in file order),
id maps that round-trip, manifest counts that add up, splits that partition the kept events, all
equal to a plain-Python reference of the pipeline. Corrupted logs must give either a `RecsysError`
naming the file and where in it, or success with every dropped row counted in the manifest; any
other exception fails the test.

`RECSYS_FUZZ_EXAMPLES=N` runs N examples per test instead of the default few dozen.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from recsys_mamba.data import buckets, prepare
from recsys_mamba.data import format as fmt
from recsys_mamba.errors import RecsysError
from tests.helpers import fuzz_settings

I64 = (-(2**63), 2**63 - 1)


# ---- the formats ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    name: str  # data.format
    kind: str  # csv | parquet | ml | recbole | taobao | sequences | pairs
    sep: str = ","
    str_ids: bool = True  # whether string ids can be written
    optional: tuple[str, ...] = ()  # optional fields the format can carry
    positional: bool = False  # timestamps are positions in the user's sequence
    max_time: int = I64[1]


FORMATS = [
    Format("events", "csv", ",", optional=("rating", "category", "event_type", "label")),
    Format("events", "csv", ";", optional=("rating", "category", "event_type", "label")),
    Format("events", "csv", "\t", optional=("rating", "category", "event_type", "label")),
    Format("events", "parquet", optional=("rating", "category", "event_type", "label")),
    Format("movielens", "ml", "::", optional=("rating",)),
    Format("movielens", "ml", "\t", optional=("rating",)),
    Format("recbole", "recbole", "\t", optional=("rating",), max_time=2**53),
    Format("taobao", "taobao", ",", optional=("category", "event_type")),
    Format("sequences", "sequences", " ", positional=True),
    Format("sequence_pairs", "pairs", " ", positional=True),
]

# characters a string id may not hold in each text format (beyond newlines), and at its ends
FORBIDDEN = {
    "csv": "",
    "parquet": "",
    "ml": "\t",  # and no '::' nor a ':' at either end (see _str_ids)
    "recbole": "\t",
    "taobao": ",",
    "sequences": ", :",
    "pairs": " ",
}


@dataclass
class Event:
    user: Any
    item: Any
    time: int
    rating: float | None = None
    category: Any = None
    event_type: str | None = None
    label: int | None = None


@dataclass
class Log:
    form: Format
    str_ids: bool
    fields: tuple[str, ...]
    events: list[Event]
    spec: dict[str, Any] = field(default_factory=dict)
    gz: bool = False
    crlf: bool = False
    bom: bool = False
    columns: dict[str, str] = field(default_factory=dict)  # field -> column name in the file
    line_lists: list[list[int]] = field(default_factory=list)  # sequences: events of each line


def _int_ids() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, 40), st.integers(*I64), st.sampled_from([I64[0], I64[1], -1, 0]))


def _str_ids(kind: str) -> st.SearchStrategy[str]:
    bad = FORBIDDEN[kind] + "\n\r\x00"
    alphabet = st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), blacklist_characters=bad)
    big = st.integers(2**63, 2**70).map(str)  # ids beyond int64: only strings can hold them
    plain = st.text(alphabet, min_size=1, max_size=6)
    if kind == "ml":
        plain = plain.filter(lambda s: "::" not in s and not s.startswith(":") and not s.endswith(":"))
    if kind in ("csv", "parquet"):  # CSV quoting keeps separators, quotes and spaces inside a field
        plain = st.text(
            st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r\n"),
            min_size=1,
            max_size=6,
        )
    return st.one_of(plain, big, st.sampled_from(["0", "007", "7", "NA", "null", "ü", "😀"]))


@st.composite
def logs(draw: st.DrawFn, form: Format | None = None) -> Log:
    form = form or draw(st.sampled_from(FORMATS))
    str_ids = form.str_ids and draw(st.booleans())
    ids = _str_ids(form.kind) if str_ids else _int_ids()
    users = draw(st.lists(ids, min_size=1, max_size=5, unique=True))
    items = draw(st.lists(ids, min_size=1, max_size=8, unique=True))
    fields = tuple(f for f in form.optional if draw(st.booleans()))
    small_time = st.integers(0, 6)  # many ties
    times = st.one_of(small_time, st.integers(0, form.max_time), st.just(form.max_time))
    labels = st.sampled_from(["a", "b", "Zz", "é", "1", "10", "9"])
    event = st.builds(
        Event,
        user=st.sampled_from(users),
        item=st.sampled_from(items),
        time=times,
        rating=st.one_of(st.none(), st.floats(-1e6, 1e6, width=32, allow_subnormal=False))
        if "rating" in fields
        else st.none(),
        category=(st.integers(0, 2**40) if form.kind == "taobao" else st.one_of(st.none(), labels))
        if "category" in fields
        else st.none(),
        event_type=st.one_of(st.none(), st.sampled_from(["pv", "buy", "cart"]))
        if "event_type" in fields
        else st.none(),
        label=st.one_of(st.none(), st.sampled_from([0, 1])) if "label" in fields else st.none(),
    )
    events = draw(st.lists(event, min_size=1, max_size=30))
    if form.kind == "taobao":  # the format has no empty category or behaviour field
        for e in events:
            e.category = e.category if e.category is not None else 1
            e.event_type = e.event_type or "pv"
    log = Log(form, str_ids, fields, events)
    if form.kind == "sequences":
        # lines hold one user's consecutive events; a user may have several lines
        cuts, start = [], 0
        while start < len(events):
            n = draw(st.integers(1, 4))
            cuts.append(list(range(start, min(start + n, len(events)))))
            start += n
        log.line_lists = []
        for cut in cuts:
            for i in cut:
                events[i].user = events[cut[0]].user
            log.line_lists.append(cut)
    if form.positional:
        _position_times(log)
    log.gz = form.kind not in ("parquet",) and draw(st.booleans())
    log.crlf = form.kind not in ("parquet",) and draw(st.integers(0, 3)) == 0
    log.bom = form.kind == "csv" and draw(st.integers(0, 3)) == 0
    if form.kind in ("csv", "parquet"):
        names = draw(st.permutations(["user_id", "item_id", "timestamp", *fields, "extra"]))
        rename = draw(st.booleans())
        log.columns = {f: (f"c {f} é" if rename else f) for f in names}
    log.spec = draw(spec_options(form))
    return log


def _position_times(log: Log) -> None:
    if log.form.kind == "sequences":
        for line in log.line_lists:
            for pos, i in enumerate(line):
                log.events[i].time = pos
    else:
        seen: Counter = Counter()
        for e in log.events:
            e.time = seen[e.user]
            seen[e.user] += 1


@st.composite
def spec_options(draw: st.DrawFn, form: Format) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "duplicates": draw(st.sampled_from(["keep", "exact", "first", "last"])),
        "filter": {
            "min_user": draw(st.integers(0, 3)),
            "min_item": draw(st.integers(0, 3)),
            "iterative": draw(st.booleans()),
        },
        "engine": draw(st.sampled_from(["streaming", "in_memory"])),
    }
    if not form.positional and draw(st.integers(0, 3)) == 0:
        test = draw(st.integers(0, 8))
        spec["split"] = {"kind": "temporal", "test_time": test, "valid_time": draw(st.integers(0, test))}
    else:
        spec["split"] = {"kind": "loo", "min_events": draw(st.integers(0, 4))}
    return spec


# ---- writing ----------------------------------------------------------------------------------------


def _num(x: float) -> str:
    return repr(float(x))


def write(log: Log, folder: Path) -> Path:
    kind, sep = log.form.kind, log.form.sep
    if kind == "parquet":
        path = folder / "log.parquet"
        _frame(log).write_parquet(path)
        return path
    if kind == "csv":
        buf = io.StringIO()
        _frame(log).write_csv(buf, separator=sep, quote_style="necessary")
        text = buf.getvalue()
    else:
        text = "".join(line + "\n" for line in _lines(log))
    if log.crlf:
        text = text.replace("\n", "\r\n")
    data = ("\ufeff" if log.bom else "") + text
    suffix = {"ml": ".dat", "recbole": ".inter", "taobao": ".csv", "csv": ".csv"}.get(kind, ".txt")
    path = folder / f"log{suffix}"
    raw = data.encode()
    if log.gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def _frame(log: Log) -> pl.DataFrame:
    ids = pl.String if log.str_ids else pl.Int64
    cols: dict[str, pl.Series] = {
        "user_id": pl.Series([e.user for e in log.events], dtype=ids),
        "item_id": pl.Series([e.item for e in log.events], dtype=ids),
        "timestamp": pl.Series([e.time for e in log.events], dtype=pl.Int64),
        "rating": pl.Series([e.rating for e in log.events], dtype=pl.Float32),
        "category": pl.Series([e.category for e in log.events], dtype=pl.String),
        "event_type": pl.Series([e.event_type for e in log.events], dtype=pl.String),
        "label": pl.Series([e.label for e in log.events], dtype=pl.Int8),
        "extra": pl.Series([f"x{i}" for i in range(len(log.events))], dtype=pl.String),
    }
    return pl.DataFrame({log.columns[f]: cols[f] for f in log.columns})


def _lines(log: Log) -> list[str]:
    kind, sep, ev = log.form.kind, log.form.sep, log.events
    if kind == "sequences":
        return [
            " ".join([str(ev[line[0]].user), *(str(ev[i].item) for i in line)]) for line in log.line_lists
        ]
    if kind == "pairs":
        return [f"{e.user} {e.item}" for e in ev]
    if kind == "taobao":
        return [f"{e.user},{e.item},{e.category},{e.event_type},{e.time}" for e in ev]
    rating = ["" if e.rating is None else _num(e.rating) for e in ev]
    if kind == "recbole":
        header = "\t".join(
            [
                "user_id:token",
                "item_id:token",
                *(["rating:float"] if "rating" in log.fields else []),
                "timestamp:float",
            ]
        )
        body = [
            "\t".join([str(e.user), str(e.item), *([r] if "rating" in log.fields else []), str(e.time)])
            for e, r in zip(ev, rating, strict=True)
        ]
        return [header, *body]
    return [sep.join([str(e.user), str(e.item), r, str(e.time)]) for e, r in zip(ev, rating, strict=True)]


def data_spec(log: Log, path: Path) -> dict[str, Any]:
    form = log.form
    spec: dict[str, Any] = {
        "name": "fuzz",
        "format": form.name,
        "path": str(path),
        "id_type": "str" if log.str_ids else "int",
        **log.spec,
    }
    if form.kind in ("csv", "parquet"):
        spec["columns"] = {f: log.columns.get(f) for f in ("user_id", "item_id", "timestamp", *OPTIONAL)}
        if form.kind == "csv":
            spec["separator"] = form.sep
    if form.kind == "ml":
        spec["separator"] = form.sep
    if form.kind == "recbole" and "rating" in log.fields:
        spec["columns"] = {"rating": "rating"}
    return spec


OPTIONAL = ("event_type", "rating", "label", "category")


# ---- the reference pipeline ---------------------------------------------------------------------


def _key(log: Log, value: Any) -> Any:
    return value if log.str_ids else int(value)


def reference(log: Log) -> dict[str, Any]:
    """What `prepare` must produce, computed in plain Python from the events in file order."""
    spec = log.spec
    rows = list(enumerate(log.events))
    rows.sort(key=lambda r: (_key(log, r[1].user), r[1].time, r[0]))  # stable: ties keep file order
    dropped: Counter = Counter()
    policy = spec["duplicates"]
    if policy != "keep":
        seen: set = set()
        kept = []
        order = reversed(rows) if policy == "last" else rows
        for r in order:
            e = r[1]
            k = (e.user, e.item, e.time, e.event_type) if policy == "exact" else (e.user, e.item)
            if k in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(k)
            kept.append(r)
        rows = sorted(kept, key=lambda r: (_key(log, r[1].user), r[1].time, r[0]))
    flt = spec["filter"]
    while True:
        changed = False
        for attr, minimum, reason in (
            ("item", flt["min_item"], "min_item"),
            ("user", flt["min_user"], "min_user"),
        ):
            counts = Counter(getattr(r[1], attr) for r in rows)
            rare = {v for v, n in counts.items() if n < minimum} if minimum > 1 else set()
            if rare:
                before = len(rows)
                rows = [r for r in rows if getattr(r[1], attr) not in rare]
                dropped[reason] += before - len(rows)
                changed = True
        if not flt["iterative"] or not changed:
            break
    split = spec["split"]
    out = []
    per_user = Counter(r[1].user for r in rows)
    position: Counter = Counter()
    for _, e in rows:
        n, position[e.user] = per_user[e.user], position[e.user] + 1
        i = position[e.user]
        if split["kind"] == "temporal":
            s = 2 if e.time >= split["test_time"] else 1 if e.time >= split["valid_time"] else 0
        else:
            m = max(split["min_events"], 2)
            s = 0 if n < m else 2 if i == n else 1 if i == n - 1 else 0
        out.append((str(e.user), str(e.item), e.time, s, e))
    return {"rows": out, "dropped": {k: v for k, v in dropped.items() if v}}


# ---- checking an output folder ------------------------------------------------------------------


def check_invariants(folder: Path, raw: int) -> dict[str, Any]:
    """The output contract's invariants that hold for any input; returns the manifest."""
    m = json.loads((folder / fmt.MANIFEST).read_text())
    inter = pl.read_parquet(folder / fmt.INTERACTIONS)
    users = pl.read_parquet(folder / fmt.USER_MAP)
    items = pl.read_parquet(folder / fmt.ITEM_MAP)
    seqs = pl.read_parquet(folder / fmt.SEQUENCES)
    assert dict(inter.schema) == fmt.INTERACTIONS_SCHEMA
    # counts add up: raw = kept + drops by reason, and each step starts where the last ended
    assert m["steps"][0]["step"] == "read" and m["steps"][0]["rows_in"] == raw
    assert m["n_interactions"] == inter.height == raw - sum(m["dropped"].values())
    assert all(n > 0 for n in m["dropped"].values())
    for before, after in zip(m["steps"], m["steps"][1:], strict=False):
        assert after["rows_in"] == before["rows_out"]
    assert m["steps"][-1]["rows_out"] == inter.height
    # maps: contiguous 1..n, unique ids, and every index used
    for mp, idx, col, n in (
        (users, "user_idx", "user_id", m["n_users"]),
        (items, "item_idx", "item_id", m["n_items"]),
    ):
        assert mp[idx].to_list() == list(range(1, n + 1))
        assert mp[col].n_unique() == n and mp[col].null_count() == 0
        assert set(inter[idx].unique().to_list()) == set(range(1, n + 1))
    # chronological per user, users in index order
    assert inter["user_idx"].is_sorted()
    for times in inter.group_by("user_idx", maintain_order=True).agg("timestamp")["timestamp"].to_list():
        assert times == sorted(times)
    # splits partition the kept events
    assert set(inter["split"].unique().to_list()) <= {0, 1, 2}
    assert items["count"].sum() == (inter["split"] == 0).sum()
    # sequences.parquet is interactions.parquet grouped by user
    assert seqs["user_idx"].to_list() == list(range(1, m["n_users"] + 1))
    for name, src in fmt.SEQUENCE_COLUMNS.items():
        assert seqs[name].explode().to_list() == inter[src].to_list()
    return m


def check_against_reference(log: Log, folder: Path, m: dict[str, Any]) -> None:
    ref = reference(log)
    assert m["dropped"] == ref["dropped"]
    inter = pl.read_parquet(folder / fmt.INTERACTIONS)
    user_id = dict(pl.read_parquet(folder / fmt.USER_MAP).iter_rows())
    item_id = dict(pl.read_parquet(folder / fmt.ITEM_MAP).select("item_idx", "item_id").iter_rows())
    got = [
        (user_id[u], item_id[i], t, s)
        for u, i, t, s in inter.select("user_idx", "item_idx", "timestamp", "split").iter_rows()
    ]
    assert got == [r[:4] for r in ref["rows"]]
    # the maps round-trip: ids sorted in their own type, as strings
    users = sorted({_key(log, r[4].user) for r in ref["rows"]})
    assert [user_id[i + 1] for i in range(len(users))] == [str(u) for u in users]
    ratings = inter["rating"].to_list()
    for r, got_rating in zip(ref["rows"], ratings, strict=True):
        want = r[4].rating
        assert (got_rating is None) == (want is None) and (want is None or got_rating == pytest.approx(want))
    if "category" in log.fields:
        cats = dict(pl.read_parquet(folder / fmt.CATEGORY_MAP).iter_rows()) if m["n_categories"] else {}
        names = [cats.get(c) for c in inter["category_idx"].to_list()]
        assert names == [None if r[4].category is None else str(r[4].category) for r in ref["rows"]]
    if "event_type" in log.fields:
        types = [None, *m["event_types"]]
        assert [types[t] for t in inter["event_type_idx"].to_list()] == [r[4].event_type for r in ref["rows"]]


# ---- valid logs ---------------------------------------------------------------------------------


def _run(spec: dict[str, Any], folder: Path) -> Path:
    return prepare(spec, folder / "out", folder / "cache")


def _expect_empty(log: Log) -> bool:
    return not reference(log)["rows"]


@pytest.mark.parametrize("form", FORMATS, ids=lambda f: f"{f.name}-{f.kind}-{f.sep!r}")
def test_valid_logs_keep_every_event_in_order(form: Format, reliability) -> None:
    @fuzz_settings(default=12)
    @given(log=logs(form))
    def check(log: Log) -> None:
        reliability.fuzz("pipeline/valid-logs")
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            src = write(log, folder)
            spec = data_spec(log, src)
            if _expect_empty(log):  # the filters drop everything: a clear error, nothing written
                with pytest.raises(RecsysError, match="no events left after step"):
                    _run(spec, folder)
                assert not (folder / "out").exists()
                return
            out = _run(spec, folder)
            m = check_invariants(out, len(log.events))
            check_against_reference(log, out, m)

    check()


def test_extreme_ids_and_times_round_trip(tmp_path: Path, reliability) -> None:
    """int64 limits as ids and times (the packed sort key must not overflow) and a single-event user."""
    events = [
        Event(I64[0], I64[1], I64[1]),
        Event(I64[0], 0, 0),
        Event(I64[1], I64[0], I64[1]),
        Event(I64[1], 5, I64[1]),
        Event(0, 5, 3),
    ]
    for form in (FORMATS[0], FORMATS[3]):
        log = Log(form, False, (), [Event(e.user, e.item, e.time) for e in events])
        log.columns = {c: c for c in ("user_id", "item_id", "timestamp")}
        log.spec = {
            "duplicates": "keep",
            "filter": {"min_user": 0, "min_item": 0, "iterative": True},
            "split": {"kind": "loo", "min_events": 2},
            "engine": "streaming",
        }
        folder = tmp_path / form.kind
        folder.mkdir()
        out = _run(data_spec(log, write(log, folder)), folder)
        check_against_reference(log, out, check_invariants(out, len(events)))
        reliability.fuzz("pipeline/valid-logs")


# ---- corrupted logs -----------------------------------------------------------------------------

GARBAGE = st.sampled_from(
    [
        "x",
        "1.5",
        "1e3",
        "NaN",
        "nan",
        "inf",
        "-inf",
        "-",
        "",
        "  ",
        "ü",
        "9" * 25,
        "-" + "9" * 20,
        "0x10",
        "1,5",
        '"',
        "\\N",
        "None",
        "true",
        "2**63",
    ]
)
CORRUPTIONS = [
    "wrong_type",
    "truncate",
    "bad_bytes",
    "bad_rating",
    "bad_time",
    "mixed_separator",
    "extra_field",
    "missing_field",
    "blank_lines",
    "empty",
    "header_only",
    "duplicate_header",
]


@st.composite
def corrupted(draw: st.DrawFn) -> tuple[Log, str, Any]:
    form = draw(st.sampled_from([f for f in FORMATS if f.kind != "parquet"]))
    log = draw(logs(form))
    log.gz = False
    kind = draw(st.sampled_from(CORRUPTIONS))
    detail = {
        "wrong_type": (draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6)), draw(GARBAGE)),
        "truncate": draw(st.floats(0, 1)),
        "bad_bytes": (
            draw(st.floats(0, 1)),
            draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"])),
        ),
        "bad_rating": (draw(st.integers(0, 10**6)), draw(st.sampled_from(["nan", "NaN", "inf", "-inf"]))),
        "bad_time": (
            draw(st.integers(0, 10**6)),
            draw(st.sampled_from([-1, -(2**40), I64[0], 2**63, 10**30, 2**62])),
        ),
        "mixed_separator": (
            draw(st.integers(0, 10**6)),
            draw(st.sampled_from([",", ";", "\t", " ", "|", "::"])),
        ),
        "extra_field": (draw(st.integers(0, 10**6)), draw(GARBAGE)),
        "missing_field": draw(st.integers(0, 10**6)),
        "blank_lines": (draw(st.integers(0, 10**6)), draw(st.sampled_from(["\n", "\n\n", "   \n", "\t\n"]))),
    }.get(kind)
    log.spec["on_null"] = draw(st.sampled_from(["error", "drop"]))
    return log, kind, detail


def _data_lines(log: Log, text: str) -> tuple[list[str], list[str]]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    header = 1 if log.form.kind in ("csv", "recbole") else 0
    return lines[:header], lines[header:]


def corrupt(log: Log, kind: str, detail: Any, path: Path) -> None:
    raw = path.read_bytes()
    text = raw.decode()
    header, body = _data_lines(log, text)
    sep = log.form.sep
    if kind == "empty":
        path.write_bytes(b"")
        return
    if kind == "header_only":
        path.write_text("".join(h + "\n" for h in header))
        return
    if kind == "truncate":
        path.write_bytes(raw[: int(len(raw) * detail)])
        return
    if kind == "bad_bytes":
        at = int(len(raw) * detail[0])
        path.write_bytes(raw[:at] + detail[1] + raw[at:])
        return
    if kind == "duplicate_header":
        body = body + header if header else body + body[:1]
    elif kind == "blank_lines":
        at = detail[0] % (len(body) + 1)
        body = body[:at] + [detail[1].rstrip("\n")] * detail[1].count("\n") + body[at:]
    else:
        at = detail if isinstance(detail, int) else detail[0]
        at %= len(body)
        fields = body[at].split(sep) if sep != " " else body[at].split(" ")
        if kind == "wrong_type":
            fields[detail[1] % len(fields)] = detail[2]
        elif kind == "bad_rating":
            rating_at = {"ml": 2, "recbole": 2, "csv": None}.get(log.form.kind)
            if log.form.kind == "csv" and "rating" in log.fields:
                rating_at = list(log.columns).index("rating")
            if rating_at is None or "rating" not in log.fields:
                rating_at = len(fields) - 1  # a format without ratings: a bad value in the last field
            fields[rating_at] = detail[1]
        elif kind == "bad_time":
            time_at = len(fields) - 1
            if log.form.kind == "csv":
                time_at = list(log.columns).index("timestamp")
            fields[time_at] = str(detail[1])
        elif kind == "mixed_separator":
            body[at] = detail[1].join(fields)
            fields = None
        elif kind == "extra_field":
            fields.append(detail[1])
        elif kind == "missing_field":
            fields.pop()
        if fields is not None:
            body[at] = sep.join(fields)
    path.write_text("".join(line + "\n" for line in header + body))


LOCATION = re.compile(
    r"line \d+|row \d+|rows? \[|column|the file is empty|no events left|Parquet|does not look like|header"
    r"|gzip"
)


def _record_count(log: Log, path: Path) -> tuple[int, int]:
    """Bounds of the data records polars may see in a text file: non-blank lines (sequence files:
    item tokens, a line without items being one record) up to all lines (blank ones read as empty)."""
    text = path.read_text(encoding="utf-8-sig", errors="replace")  # bad bytes in an unused column name
    _, body = _data_lines(log, text.replace("\r\n", "\n"))
    if log.form.kind == "csv":
        records = [r for r in csv.reader(io.StringIO(text), delimiter=log.form.sep)][1:]
        nonblank = sum(1 for r in records if r)
        return nonblank, len(records)
    if log.form.kind == "sequences":
        n = sum(max(len([t for t in line.strip().split(" ")[1:] if t]), 1) for line in body if line.strip())
        return n, n
    nonblank = sum(1 for line in body if line.strip())
    return nonblank, len(body)


def check_outcome(run, src: Path, log: Log | None = None, raw_expected: int | None = None) -> str:
    """Run `run()`; a RecsysError must name the file and a place in it; success must account for
    every record. Anything else is a bug. Returns "error" or "ok"."""
    try:
        out = run()
    except RecsysError as err:
        msg = str(err)
        assert str(src) in msg, msg
        assert LOCATION.search(msg), msg
        assert "Traceback" not in msg and "\n" not in msg, msg
        return "error"
    m = json.loads((out / fmt.MANIFEST).read_text())
    raw = m["steps"][0]["rows_in"]
    if log is not None:
        lo, hi = _record_count(log, src)
        assert lo <= raw <= hi, (lo, raw, hi)
    if raw_expected is not None:
        assert raw == raw_expected
    check_invariants(out, raw)
    return "ok"


@fuzz_settings(default=150)
@given(case=corrupted())
def test_corrupted_logs_fail_clearly_or_count_what_they_drop(case, reliability) -> None:
    log, kind, detail = case
    reliability.fuzz("pipeline/corrupt-logs")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        src = write(log, folder)
        corrupt(log, kind, detail, src)
        check_outcome(lambda: _run(data_spec(log, src), folder), src, log)


PARQUET_COLUMNS = st.sampled_from(
    [
        pl.Series([1.5, 2.0, 3.0]),
        pl.Series([float("nan"), 1.0, 2.0]),
        pl.Series([float("inf"), 1.0, 2.0]),
        pl.Series([1.0, 2.0, 3.0]),
        pl.Series([2.0**63, 1.0, 2.0]),
        pl.Series(["1", "x", "3"]),
        pl.Series(["1", "2", None]),
        pl.Series([None, None, None], dtype=pl.Int64),
        pl.Series([[1], [2], [3]]),
        pl.Series([{"a": 1}, {"a": 2}, {"a": 3}]),
        pl.Series([True, False, True]),
        pl.Series([b"\xff", b"a", b"b"]),
        pl.Series([2**64 - 1, 1, 2], dtype=pl.UInt64),
        pl.Series([-5, 1, 2]),
        pl.Series([1, 2, 3], dtype=pl.Int8),
        pl.Series(["2024-01-01", "b", "c"]).cast(pl.Categorical),
        pl.Series([1, 2, 3]).cast(pl.Datetime("ns")),
        pl.Series([1, 2, 3]).cast(pl.Date),
        pl.Series([1, 2, 3]).cast(pl.Decimal(10, 2)),
    ]
)


@fuzz_settings(default=60)
@given(
    column=st.sampled_from(["user_id", "item_id", "timestamp", "rating", "label", "category"]),
    values=PARQUET_COLUMNS,
    str_ids=st.booleans(),
    on_null=st.sampled_from(["error", "drop"]),
    damage=st.sampled_from([None, "truncate", "flip", "garbage"]),
    at=st.floats(0, 1),
)
def test_corrupted_parquet(column, values, str_ids, on_null, damage, at, reliability) -> None:
    reliability.fuzz("pipeline/corrupt-logs")
    frame = {
        "user_id": pl.Series([1, 1, 2]),
        "item_id": pl.Series([5, 6, 5]),
        "timestamp": pl.Series([3, 1, 2]),
        "rating": pl.Series([4.0, 2.0, 5.0]),
        "label": pl.Series([1, 0, 1], dtype=pl.Int8),
        "category": pl.Series(["a", "b", "a"]),
    }
    frame[column] = values.alias(column)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        src = folder / "log.parquet"
        pl.DataFrame(frame).write_parquet(src)
        raw = src.read_bytes()
        cut = int(len(raw) * at)
        if damage == "truncate":
            src.write_bytes(raw[:cut])
        elif damage == "flip":
            src.write_bytes(raw[:cut] + bytes([raw[cut % len(raw)] ^ 0xFF]) + raw[cut + 1 :])
        elif damage == "garbage":
            src.write_bytes(b"PAR1" + os.urandom(64))
        spec = {
            "name": "fuzz",
            "format": "events",
            "path": str(src),
            "id_type": "str" if str_ids else "int",
            "on_null": on_null,
            "columns": {c: c for c in frame},
        }
        check_outcome(lambda: _run(spec, folder), src, raw_expected=None if damage else 3)


def test_gzip_that_is_not_gzip(tmp_path: Path, reliability) -> None:
    src = tmp_path / "log.csv.gz"
    src.write_bytes(b"\x1f\x8b" + b"not really gzip")
    check_outcome(lambda: _run({"name": "g", "format": "events", "path": str(src)}, tmp_path), src)
    reliability.fuzz("pipeline/corrupt-logs")


def test_a_non_finite_value_is_never_kept(tmp_path: Path) -> None:
    """NaN ratings and negative times are refused, or dropped and counted, never written."""
    src = tmp_path / "log.csv"
    src.write_text("user_id,item_id,timestamp,rating\n1,2,3,NaN\n1,3,-4,inf\n1,4,5,4\n2,2,6,1\n")
    spec = {"name": "n", "path": str(src), "columns": {"rating": "rating"}, "on_null": "drop"}
    out = _run(spec, tmp_path)
    m = json.loads((out / fmt.MANIFEST).read_text())
    assert m["dropped"] == {"nonfinite_rating": 2} and m["n_interactions"] == 2
    assert all(math.isfinite(r) for r in pl.read_parquet(out / fmt.INTERACTIONS)["rating"].to_list())
    with pytest.raises(RecsysError, match=r"column 'rating' must hold finite numbers .* at line 2, line 3"):
        _run({**spec, "on_null": "error"}, tmp_path / "again")


# ---- any number of buckets, the same bytes --------------------------------------------------------

VOLATILE = ("created_at", "prepare_seconds", "sources", "package_version")


def folder_bytes(folder: Path) -> dict[str, Any]:
    """Every file of a prepared folder as bytes; the manifest without its timing fields."""
    out: dict[str, Any] = {}
    for p in sorted(folder.iterdir()):
        if p.name == fmt.MANIFEST:
            out[p.name] = {k: v for k, v in json.loads(p.read_text()).items() if k not in VOLATILE}
        else:
            out[p.name] = p.read_bytes()
    return out


def outcome(spec: dict[str, Any], folder: Path, n_buckets: int, workers: int = 1) -> Any:
    """The bytes `prepare` writes with `n_buckets` buckets, `workers` at a time, or the error it gives."""
    try:
        out = prepare(
            spec, folder / f"out{n_buckets}-{workers}", folder / "cache", buckets=n_buckets, workers=workers
        )
    except RecsysError as err:
        return f"error: {err}"
    return folder_bytes(out)


CTR_OPTIONS = st.one_of(
    st.none(),
    st.builds(
        lambda k, seed: {"label_from": "none", "negatives": k, "seed": seed},
        st.integers(0, 2),
        st.integers(0, 9),
    ),
)


@pytest.mark.parametrize("form", FORMATS, ids=lambda f: f"{f.name}-{f.kind}-{f.sep!r}")
def test_bucket_count_does_not_change_a_byte(form: Format, reliability) -> None:
    """1, 3 and 16 buckets (most of them empty or holding one user here), one or several at a time,
    give byte-identical files and the same manifest, or the same error."""

    @fuzz_settings(default=4)
    @given(log=logs(form), ctr=CTR_OPTIONS, small_times=st.booleans())
    def check(log: Log, ctr: dict[str, Any] | None, small_times: bool) -> None:
        reliability.fuzz("pipeline/buckets")
        if small_times:  # small ids and times: the packed sort key's path (a mixed log takes the other)
            for e in log.events:
                e.time = e.time if form.positional else e.time % 7
                e.user = e.user if log.str_ids else e.user % 41
        with tempfile.TemporaryDirectory() as tmp, mock.patch.object(buckets, "SLICE_ROWS", 4):
            folder = Path(tmp)  # a Parquet log is partitioned in slices of 4 rows
            spec = {**data_spec(log, write(log, folder)), "ctr": ctr}
            one = outcome(spec, folder, 1)
            assert outcome(spec, folder, 3) == one
            assert outcome(spec, folder, 16) == one
            assert outcome(spec, folder, 16, workers=3) == one

    check()


@fuzz_settings(default=40)
@given(case=corrupted())
def test_bucket_count_does_not_change_what_a_corrupted_log_gives(case, reliability) -> None:
    log, kind, detail = case
    reliability.fuzz("pipeline/buckets-corrupt")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        src = write(log, folder)
        corrupt(log, kind, detail, src)
        spec = data_spec(log, src)
        one = outcome(spec, folder, 1)
        assert outcome(spec, folder, 3) == one
        assert outcome(spec, folder, 3, workers=2) == one
