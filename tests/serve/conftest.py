"""Tiny trained models exported as bundles, and the service run for real: uvicorn on a loopback port in a
thread of the test process, so requests go through HTTP, the lifespan and the single writer."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pytest

from recsys_mamba.config import compose
from tests.scoring.conftest import train_tiny


def export_tiny(tmp_path_factory: pytest.TempPathFactory, *overrides: str) -> dict[str, Path]:
    from recsys_mamba.export import export

    trained = train_tiny(tmp_path_factory, *overrides)
    bundle = tmp_path_factory.mktemp("export") / "bundle"
    export(compose("export", overrides=[f"ckpt_path={trained['ckpt']}", f"out_dir={bundle}"]))
    return {**trained, "bundle": bundle}


@pytest.fixture(scope="session")
def mamba_bundle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # the transition prior over three lags: the service must rank with the user's last items as the job does
    return export_tiny(
        tmp_path_factory, "head.seen_bias=true", "head.transition_prior=true", "head.transition_lags=3"
    )


@pytest.fixture(scope="session")
def sasrec_bundle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return export_tiny(tmp_path_factory, "model=sasrec", "model.d_model=16", "model.max_len=40")


@pytest.fixture(scope="session")
def gru4rec_bundle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return export_tiny(tmp_path_factory, "model=gru4rec", "model.d_model=16")


def events_of(model: dict[str, Path]) -> pl.DataFrame:
    return pl.read_parquet(model["events"]).with_columns(pl.col("user_id", "item_id").cast(pl.String))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(bundle: Path, store: str, **settings: object) -> Iterator[str]:
    """The service of `bundle` over `store` on a free loopback port; yields its base URL."""
    import uvicorn

    from recsys_mamba.serving.app import build_app
    from recsys_mamba.serving.service import Service, Settings

    app = build_app(Service.open(bundle, store, Settings(**settings)))  # type: ignore[arg-type]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (the one on PATH) with an fsynced append-only file, on a free port."""
    binary = shutil.which("redis-server")
    if binary is None:
        try:
            import redis_server  # the pip package that ships the binary

            binary = redis_server.REDIS_SERVER_PATH
        except ImportError:
            pytest.skip("no redis-server binary (apt-get install redis-server, or pip install redis-server)")
    folder = tmp_path_factory.mktemp("redis")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--appendonly", "yes",
         "--appendfsync", "always", "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None:
                pytest.skip(f"redis-server exited with status {proc.returncode} at start")
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.skip("redis-server did not answer within 10 s")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()
