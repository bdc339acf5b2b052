"""Tiny trained runs shared by the evaluation tests: trained once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys_mamba.training.run import train
from tests.helpers import tiny_cfg


def _train(root: Path, name: str, cache: Path, overrides: list[str]) -> Path:
    out = root / name
    train(tiny_cfg(out, ["logger=[]", *overrides], cache_dir=cache))
    return next((out / "checkpoints").glob("epoch_*.ckpt"))


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints: three CTR models on the same data (two of one encoder, one with a name=), one on
    other data, one next-click model."""
    root = tmp_path_factory.mktemp("eval_runs")
    cache = root / "cache"
    return {
        "ctr_mamba": _train(root, "ctr_mamba", cache, ["experiment=ctr", "model=mamba"]),
        "ctr_sasrec": _train(root, "ctr_sasrec", cache, ["experiment=ctr", "model=sasrec", "name=attention"]),
        "ctr_mamba_seed7": _train(
            root, "ctr_mamba_seed7", cache, ["experiment=ctr", "model=mamba", "seed=7"]
        ),
        "ctr_other": _train(
            root, "ctr_other", cache, ["experiment=ctr", "model=mamba", "data.synthetic.n_users=120"]
        ),
        "next_item": _train(root, "next_item", cache, ["experiment=next_item", "model=sasrec"]),
    }


@pytest.fixture(scope="session")
def reports(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Report folders: the CTR pair compared, two runs of one encoder compared, and the next-click
    model alone."""
    from recsys_mamba.config import compose
    from recsys_mamba.evaluation import evaluate

    root = tmp_path_factory.mktemp("eval_reports")
    jobs = {
        "ctr": [f"ckpt_path={runs['ctr_mamba']}", f"compare=[{runs['ctr_sasrec']}]"],
        "ctr_same_encoder": [f"ckpt_path={runs['ctr_mamba']}", f"compare=[{runs['ctr_mamba_seed7']}]"],
        "next_item": [f"ckpt_path={runs['next_item']}"],
    }
    for name, overrides in jobs.items():
        settings = [f"out_dir={root / name}", "n_bootstrap=50", "n_permutations=100"]
        evaluate(compose("evaluate", overrides=[*overrides, *settings]))
    return {name: root / name for name in jobs}
