"""engine=local with several workers: results in bucket order, at most `workers` tasks at once, and a
failing task stops the stage as it would one task after another."""

from __future__ import annotations

import threading
import time

import pytest

from recsys_mamba.data import engines


class Tally:
    """Counts the tasks running at once and remembers which started."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.started: list[int] = []

    def task(self, bucket: int, seconds: float, fail_at: int | None = None) -> dict[str, int]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.started.append(bucket)
        try:
            time.sleep(seconds)
            if bucket == fail_at:
                raise ValueError(f"bucket {bucket} failed")
            return {"bucket": bucket}
        finally:
            with self.lock:
                self.running -= 1


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_results_come_in_bucket_order_with_at_most_workers_at_once(workers):
    tally = Tally()
    # the first buckets take longest, so with several workers later ones finish first
    calls = [(b, 0.02 * (8 - b)) for b in range(8)]
    out = list(engines.start("local", "target", workers).map(tally.task, calls))
    assert [r["bucket"] for r in out] == list(range(8))
    assert tally.most == workers


def test_a_failing_task_raises_its_own_error_and_starts_no_more():
    tally = Tally()
    calls = [(b, 0.0 if b < 3 else 0.2, 2) for b in range(12)]
    results = engines.start("local", "target", 2).map(tally.task, calls)
    got = []
    with pytest.raises(ValueError, match="bucket 2 failed"):
        for r in results:
            got.append(r["bucket"])
    assert got == [0, 1]
    # a serial run stops at bucket 2; two workers may have started one or two slow buckets beside it
    assert set(tally.started) <= set(range(6)) and tally.running == 0
