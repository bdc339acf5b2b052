"""Session-wide test helpers: the reliability ledger (fuzz cases tried, faults injected and survived).

Fuzz and fault tests record what they did through the `reliability` fixture; the totals are printed at
the end of the run (and written as JSON when RECSYS_RELIABILITY_JSON names a file), so the figures in
the README's reliability section come from a test run anyone can repeat.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import tiny_cfg, write_prepared


@dataclass
class Ledger:
    """Counts per target: fuzz cases tried, and faults injected / survived / with data lost."""

    fuzz_cases: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    faults: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: {"injected": 0, "survived": 0, "data_lost": 0})
    )

    def fuzz(self, target: str, cases: int = 1) -> None:
        """Count `cases` generated inputs tried against `target` (e.g. "pipeline/valid-logs")."""
        self.fuzz_cases[target] += cases

    def fault(self, kind: str, *, survived: bool, data_lost: bool = False) -> None:
        """Count one injected fault of `kind` (e.g. "train/sigkill"), whether it was survived."""
        row = self.faults[kind]
        row["injected"] += 1
        row["survived"] += int(survived)
        row["data_lost"] += int(data_lost)

    def empty(self) -> bool:
        return not self.fuzz_cases and not self.faults

    def as_dict(self) -> dict[str, object]:
        totals = {k: sum(r[k] for r in self.faults.values()) for k in ("injected", "survived", "data_lost")}
        return {
            "fuzz_cases": dict(sorted(self.fuzz_cases.items())),
            "fuzz_cases_total": sum(self.fuzz_cases.values()),
            "faults": {k: dict(v) for k, v in sorted(self.faults.items())},
            "faults_total": totals,
        }


_LEDGER = Ledger()


@pytest.fixture(scope="session")
def reliability() -> Ledger:
    return _LEDGER


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _LEDGER.empty():
        return
    report = _LEDGER.as_dict()
    write = terminalreporter.write_line
    terminalreporter.section("reliability")
    for target, cases in report["fuzz_cases"].items():
        write(f"fuzz   {target:<40} {cases:>7} cases tried")
    write(f"fuzz   {'total':<40} {report['fuzz_cases_total']:>7} cases tried")
    for kind, row in report["faults"].items():
        write(
            f"fault  {kind:<40} {row['injected']:>4} injected {row['survived']:>4} survived "
            f"{row['data_lost']:>3} with data lost"
        )
    t = report["faults_total"]
    write(
        f"fault  {'total':<40} {t['injected']:>4} injected {t['survived']:>4} survived "
        f"{t['data_lost']:>3} with data lost"
    )
    out = os.environ.get("RECSYS_RELIABILITY_JSON")
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """One local two-CPU Ray cluster for the session (the engine=ray tests of prepare and score), whose
    workers read failpoints from the folder it yields: a file `<task>-<i>` kills the worker of task
    `<task>` on bucket or partition i once, `<task>-<i>.always` every time
    (`recsys_mamba.data.tasks.failpoint`)."""
    ray = pytest.importorskip("ray", reason="engine=ray needs the ray extra (pip install -e '.[dev]')")
    from recsys_mamba.data.tasks import FAILPOINTS

    failpoints = tmp_path_factory.mktemp("failpoints")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {FAILPOINTS: str(failpoints)}},
    )
    try:
        yield failpoints
    finally:
        ray.shutdown()


@pytest.fixture
def tiny():
    """`tests.helpers.tiny_cfg`: the real train config, shrunk to tiny data and model, one short epoch."""
    return tiny_cfg


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    return write_prepared(tmp_path / "prepared")
