"""Evaluation report: `python -m recsys_mamba.evaluate ckpt_path=PATH [compare=[...]] out_dir=DIR`."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from recsys_mamba.config import hydra_entry


@hydra_entry("evaluate")
def main(cfg: DictConfig) -> dict[str, Any]:
    from recsys_mamba.evaluation import evaluate

    return evaluate(cfg)


if __name__ == "__main__":
    main()
