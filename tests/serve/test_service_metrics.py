"""The service's collector-pause timer counts the collections it sees, and stops when removed."""

from __future__ import annotations

import gc

from recsys_mamba.serving.metrics import GCTimer, Metrics


def _count(metrics: Metrics, generation: int) -> float:
    text = metrics.render()[0].decode()
    prefix = f'recsys_gc_pause_seconds_count{{generation="{generation}"}}'
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_collector_pauses_are_timed_while_installed() -> None:
    metrics = Metrics(lambda: 0)
    timer = GCTimer(metrics.gc_pause)
    timer.install()
    try:
        gc.collect()
        gc.collect()
    finally:
        timer.remove()
    seen = _count(metrics, 2)
    assert seen >= 2
    gc.collect()
    assert _count(metrics, 2) == seen
    assert timer not in gc.callbacks
