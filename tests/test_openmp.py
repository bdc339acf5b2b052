"""`import recsys_mamba` makes idle OpenMP threads sleep unless the user chose a wait policy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from recsys_mamba.openmp import prefer_passive_wait


def test_sets_passive_only_when_the_user_has_not_chosen():
    env: dict[str, str] = {}
    assert prefer_passive_wait(env) and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        env = dict(chosen)
        assert not prefer_passive_wait(env) and env == chosen


@pytest.mark.parametrize(
    ("given", "seen"),
    [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"), ({"GOMP_SPINCOUNT": "1000"}, None)],
)
def test_import_sets_it_before_torch_loads(given, seen):
    """The package import, not a later call, sets it: libgomp reads it once, at load."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = "import os, sys, recsys_mamba; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, **given}, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [str(seen), "False"]
