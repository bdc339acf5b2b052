"""Score users with a trained checkpoint: `python -m recsys_mamba.score ckpt_path=... input=...`."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from recsys_mamba.config import hydra_entry

log = logging.getLogger(__name__)


@hydra_entry("score")
def main(cfg: DictConfig) -> Path:
    from recsys_mamba.scoring.job import score

    manifest = score(cfg)
    log.info("scored -> %s", manifest)
    return manifest


if __name__ == "__main__":
    main()
