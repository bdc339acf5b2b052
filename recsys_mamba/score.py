"""Score users with a trained checkpoint: `python -m recsys_mamba.score ckpt_path=... input=...`."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from recsys_mamba.config import hydra_entry


@hydra_entry("score")
def main(cfg: DictConfig) -> Path:
    from recsys_mamba.scoring.job import score

    manifest = score(cfg)
    print(f"scored -> {manifest}")
    return manifest


if __name__ == "__main__":
    main()
