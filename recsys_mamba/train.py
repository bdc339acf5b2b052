"""Train and test one model: `python -m recsys_mamba.train experiment=ctr` (see conf/train.yaml)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from recsys_mamba.config import hydra_entry


@hydra_entry("train")
def main(cfg: DictConfig) -> dict[str, Any]:
    from recsys_mamba.training.run import train

    return train(cfg)


if __name__ == "__main__":
    main()
