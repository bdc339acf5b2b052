"""`import recsys_mamba` makes Polars' jemalloc keep freed pages, unless the user configured it."""

from __future__ import annotations

import os
import subprocess
import sys

from recsys_mamba.allocator import MALLOC_CONF, VARIABLE, retain_freed_pages


def test_sets_it_only_when_the_user_has_not():
    env: dict[str, str] = {}
    assert retain_freed_pages(env) and env == {VARIABLE: MALLOC_CONF}
    chosen = {VARIABLE: "dirty_decay_ms:0"}
    env = dict(chosen)
    assert not retain_freed_pages(env) and env == chosen


def _run(code: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    return subprocess.run(
        [sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True, check=True
    )


def test_import_sets_it_before_polars_loads():
    """The package import sets it, and Polars is not loaded yet then: jemalloc reads it once, at load."""
    code = "import os, sys, recsys_mamba; print(os.environ.get('_RJEM_MALLOC_CONF'), 'polars' in sys.modules)"
    assert _run(code).stdout.split() == [MALLOC_CONF, "False"]


def test_polars_jemalloc_takes_the_setting():
    """Polars' jemalloc accepts the setting (a bad pair would print '<jemalloc>: Invalid conf ...') and
    uses it: its statistics at exit show the decay times set here, not Polars' built-in ones."""
    code = "import polars as pl; pl.DataFrame({'a': range(1000)}).sum()"
    err = _run(code, **{VARIABLE: MALLOC_CONF + ",stats_print:true,stats_print_opts:mdablxe"}).stderr
    assert "Invalid conf" not in err
    for pair in MALLOC_CONF.split(","):
        name, value = pair.split(":")
        assert f"opt.{name}: {value} " in err, err[:2000]
