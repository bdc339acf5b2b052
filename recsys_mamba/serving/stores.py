"""Where the service keeps each user's encoder state: embedded SQLite (the default, zero set-up) or Redis.

A store holds, per user, the serialised encoder state (`SequenceEncoder.save_state`, with the last
output) and the items the user has had; and the ids of the events already applied, written in the same
transaction as the states they changed, so a retried event is recognised even after a crash. A store
remembers the model it was filled with: states of another model are meaningless, and are refused.

Durability: the service acknowledges an event only after `commit` returns, and `commit` returns only
once the transaction is on disk. SQLite runs in WAL mode with synchronous=FULL by default (each commit
fsyncs the log); `sqlite_synchronous=normal` skips that fsync: a killed process still loses nothing
(the log is written before the commit returns), a power cut or OS crash may lose the last commits.
The log is copied into the database (checkpointed) by a thread of the store's own, off the request
path: a checkpoint inside a commit (SQLite's default, every 1,000 pages of log) made that one commit,
and every request queued behind it, tens of milliseconds slower. The writer still checkpoints when the
log passes `BACKSTOP_PAGES`, should the thread fall behind. Redis is only as durable as its append-only
file: the store refuses a server whose `appendfsync` is
weaker than `redis_appendfsync`.
"""

from __future__ import annotations

import sqlite3
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from recsys_mamba.errors import RecsysError

STORE_HINT = "state_store=sqlite:///PATH/state.db or state_store=redis://HOST:PORT/DB"
FSYNC_LEVELS = ("always", "everysec", "no")  # Redis appendfsync, strongest first
SQLITE_SYNCHRONOUS = ("full", "normal")


@dataclass(frozen=True)
class UserRecord:
    """One user's stored state: `state` as `save_state` writes it, `seen` the item indices (int32)."""

    state: bytes
    seen: bytes

    def seen_items(self) -> list[int]:
        return np.frombuffer(self.seen, dtype=np.int32).tolist()

    @staticmethod
    def pack_seen(items: list[int]) -> bytes:
        return np.asarray(items, dtype=np.int32).tobytes()


class StateStore(ABC):
    """What the service needs of a store; every method may be called from any thread."""

    url: str

    @abstractmethod
    def get(self, users: list[str]) -> dict[str, UserRecord]:
        """The records of those of `users` the store has."""

    @abstractmethod
    def applied(self, event_ids: list[str]) -> set[str]:
        """Those of `event_ids` already applied."""

    @abstractmethod
    def commit(self, records: dict[str, UserRecord], event_ids: list[str]) -> None:
        """Write `records` and mark `event_ids` applied, all or nothing, durably before returning."""

    @abstractmethod
    def n_users(self) -> int: ...

    @abstractmethod
    def model_key(self) -> str | None:
        """The fingerprint of the model whose states the store holds (None: empty store)."""

    @abstractmethod
    def set_model_key(self, key: str) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def bind(self, key: str) -> None:
        """Refuse a store filled by another model; claim an empty one for this model."""
        found = self.model_key()
        if found is None:
            self.set_model_key(key)
        elif found != key:
            raise RecsysError(
                f"state_store={self.url} holds states of another model (fingerprint {found[:12]}, this "
                f"model's is {key[:12]}): encoder states do not carry over between models; point "
                "state_store at a new database, or serve the model that filled it"
            )


class SQLiteStore(StateStore):
    """An SQLite file in WAL mode: one connection writes, another reads (WAL lets readers run during a
    write), a third checkpoints from a thread every `checkpoint_s` seconds (0: none, the writer
    checkpoints at `BACKSTOP_PAGES`); a lock per connection because the service calls from several
    threads."""

    BACKSTOP_PAGES = 16384  # 64 MiB of log at 4 KiB pages

    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS users "
        "(user_id TEXT PRIMARY KEY, state BLOB NOT NULL, seen BLOB NOT NULL)",
        "CREATE TABLE IF NOT EXISTS applied (event_id TEXT PRIMARY KEY)",
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    )

    def __init__(self, path: Path, url: str, synchronous: str = "full", checkpoint_s: float = 0.5) -> None:
        if synchronous not in SQLITE_SYNCHRONOUS:
            raise RecsysError(f"sqlite_synchronous={synchronous!r} must be one of {list(SQLITE_SYNCHRONOUS)}")
        self.url = url
        self.path = path
        self.synchronous = synchronous
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write = self._connect()
            self._write.execute(f"PRAGMA wal_autocheckpoint={self.BACKSTOP_PAGES}")
            with self._write:
                for statement in self.SCHEMA:
                    self._write.execute(statement)
            self._read = self._connect()
            self._checkpointer = Checkpointer(self._connect(), checkpoint_s) if checkpoint_s > 0 else None
        except (sqlite3.Error, OSError) as err:
            raise RecsysError(
                f"state_store={url}: cannot open the SQLite database {path} ({err}); pass a writable "
                f"path, e.g. {STORE_HINT}"
            ) from None
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        return conn

    def get(self, users: list[str]) -> dict[str, UserRecord]:
        out: dict[str, UserRecord] = {}
        with self._read_lock:
            for start in range(0, len(users), 500):  # SQLite caps the parameters of one statement
                part = users[start : start + 500]
                marks = ",".join("?" * len(part))
                for user, state, seen in self._read.execute(
                    f"SELECT user_id, state, seen FROM users WHERE user_id IN ({marks})", part
                ):
                    out[user] = UserRecord(state, seen)
        return out

    def applied(self, event_ids: list[str]) -> set[str]:
        found: set[str] = set()
        with self._read_lock:
            for start in range(0, len(event_ids), 500):
                part = event_ids[start : start + 500]
                marks = ",".join("?" * len(part))
                rows = self._read.execute(f"SELECT event_id FROM applied WHERE event_id IN ({marks})", part)
                found.update(r[0] for r in rows)
        return found

    def commit(self, records: dict[str, UserRecord], event_ids: list[str]) -> None:
        with self._write_lock:
            conn = self._write
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT INTO users (user_id, state, seen) VALUES (?, ?, ?) ON CONFLICT(user_id) "
                    "DO UPDATE SET state = excluded.state, seen = excluded.seen",
                    [(u, r.state, r.seen) for u, r in records.items()],
                )
                conn.executemany("INSERT INTO applied (event_id) VALUES (?)", [(e,) for e in event_ids])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def n_users(self) -> int:
        with self._read_lock:
            return int(self._read.execute("SELECT COUNT(*) FROM users").fetchone()[0])

    def model_key(self) -> str | None:
        with self._read_lock:
            row = self._read.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()
        return None if row is None else str(row[0])

    def set_model_key(self, key: str) -> None:
        with self._write_lock, self._write:
            self._write.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('model', ?)", (key,))

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        with self._write_lock, self._read_lock:
            self._write.close()
            self._read.close()


class Checkpointer:
    """A daemon thread that checkpoints an SQLite WAL every `every_s` seconds on its own connection.
    PASSIVE: it copies what no reader still needs and never blocks the writer, whose next transaction
    then restarts the log from its beginning (a log of bounded size, overwritten in place)."""

    def __init__(self, conn: sqlite3.Connection, every_s: float) -> None:
        self.conn = conn
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error:  # a failed checkpoint loses nothing (the log keeps it); the next retries
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.conn.close()


class RedisStore(StateStore):
    """Redis: a hash per user (state, seen), a set of users and a set of applied event ids, all written
    in one MULTI/EXEC. `prefix` keeps several services apart on one server."""

    def __init__(self, url: str, appendfsync: str, prefix: str = "recsys:") -> None:
        try:
            import redis
        except ImportError:
            raise RecsysError(
                f"state_store={url} needs the redis client: pip install 'recsys-mamba[serve]'"
            ) from None
        self.url = url
        self.prefix = prefix
        self._client = redis.Redis.from_url(url)
        try:
            config = self._client.config_get("append*")
        except redis.RedisError as err:
            raise RecsysError(f"state_store={url}: cannot reach the Redis server ({err}); start it or fix "
                              "the URL") from None
        self._check_durable(config, appendfsync)

    def _check_durable(self, config: dict, appendfsync: str) -> None:
        got = {str(k): str(v) for k, v in config.items()}
        level = got.get("appendfsync", "no") if got.get("appendonly") == "yes" else "no"
        if FSYNC_LEVELS.index(level) > FSYNC_LEVELS.index(appendfsync):
            raise RecsysError(
                f"state_store={self.url}: the Redis server's append-only file fsyncs {level!r} but "
                f"redis_appendfsync={appendfsync!r} is required, so an acknowledged event could be lost; "
                f"start redis-server with --appendonly yes --appendfsync {appendfsync}, or lower "
                "redis_appendfsync (everysec: up to a second of acknowledged events lost on a power cut)"
            )

    def _user(self, user: str) -> str:
        return f"{self.prefix}u:{user}"

    def get(self, users: list[str]) -> dict[str, UserRecord]:
        pipe = self._client.pipeline(transaction=False)
        for user in users:
            pipe.hmget(self._user(user), "state", "seen")
        return {
            u: UserRecord(state, seen)
            for u, (state, seen) in zip(users, pipe.execute(), strict=True)
            if state is not None
        }

    def applied(self, event_ids: list[str]) -> set[str]:
        if not event_ids:
            return set()
        flags = self._client.smismember(f"{self.prefix}applied", event_ids)
        return {e for e, f in zip(event_ids, flags, strict=True) if f}

    def commit(self, records: dict[str, UserRecord], event_ids: list[str]) -> None:
        pipe = self._client.pipeline(transaction=True)
        for user, record in records.items():
            pipe.hset(self._user(user), mapping={"state": record.state, "seen": record.seen})
        if records:
            pipe.sadd(f"{self.prefix}users", *records)
        if event_ids:
            pipe.sadd(f"{self.prefix}applied", *event_ids)
        pipe.execute()

    def n_users(self) -> int:
        return int(self._client.scard(f"{self.prefix}users"))

    def model_key(self) -> str | None:
        value = self._client.get(f"{self.prefix}model")
        return None if value is None else value.decode()

    def set_model_key(self, key: str) -> None:
        self._client.set(f"{self.prefix}model", key)

    def close(self) -> None:
        self._client.close()


def open_store(url: str, redis_appendfsync: str = "always", sqlite_synchronous: str = "full") -> StateStore:
    """The store `url` names: sqlite:///PATH (a file, created when absent) or redis://HOST:PORT/DB."""
    parsed = urlparse(str(url))
    if parsed.scheme == "sqlite":
        path = str(url)[len("sqlite://") :]
        if not path or path == "/":
            raise RecsysError(f"state_store={url} names no file; e.g. {STORE_HINT}")
        # sqlite:///abs/path (three slashes) is absolute; sqlite://rel/path is relative to the launch folder
        return SQLiteStore(Path(path).expanduser(), str(url), sqlite_synchronous)
    if parsed.scheme in ("redis", "rediss", "unix"):
        return RedisStore(str(url), redis_appendfsync)
    raise RecsysError(f"state_store={url!r} is not a store URL; use {STORE_HINT}")
