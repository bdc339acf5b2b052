"""`python -m recsys_mamba.prepare data=NAME out_dir=DIR`: prepare a data set (or reuse its cache)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from recsys_mamba import checks
from recsys_mamba.config import hydra_entry
from recsys_mamba.data import load_manifest, prepare
from recsys_mamba.data.pipeline import SCALE
from recsys_mamba.data.spec import check_source, normalize
from recsys_mamba.schema import Bool, Check, PathTo, Rule, Schema

log = logging.getLogger(__name__)


def summary(folder: Path) -> str:
    m = load_manifest(folder)
    dropped = ", ".join(f"{k}={v:,}" for k, v in m["dropped"].items()) or "none"
    return (
        f"prepared {m['name']} -> {folder}\n"
        f"  users {m['n_users']:,}  items {m['n_items']:,}  interactions {m['n_interactions']:,}  "
        f"dropped: {dropped}"
    )


# Every value of conf/prepare.yaml (and the data config), before any file is read. Whether the output
# folders can be written is found out by creating them, still before reading.
PREPARE = Schema(
    Rule("overwrite", Bool()),
    Rule("out_dir", PathTo(optional=True)),
    Rule("paths.cache_dir", PathTo()),
    SCALE,
    Check(lambda cfg: check_source(normalize(checks.select(cfg, "data")))),
)


def validate_config(cfg: DictConfig) -> None:
    PREPARE.validate(cfg)


@hydra_entry("prepare")
def main(cfg: DictConfig) -> Path:
    validate_config(cfg)
    folder = prepare(
        cfg.data,
        cfg.out_dir,
        cfg.paths.cache_dir,
        overwrite=cfg.overwrite,
        engine=cfg.engine,
        buckets=cfg.buckets,
        bucket_events=cfg.bucket_events,
        workers=cfg.workers,
    )
    log.info(summary(folder))
    return folder


if __name__ == "__main__":
    main()
