"""Train and test one model: `python -m recsys_mamba.train experiment=ctr` (see conf/train.yaml)."""

from __future__ import annotations

from omegaconf import DictConfig

from recsys_mamba.config import hydra_entry


@hydra_entry("train")
def main(cfg: DictConfig) -> float:
    """Train and test; returns the value of `optimized_metric` (what a Hydra sweeper such as
    `hparams_search=optuna` optimises). Everything else is in the run folder's metrics.json."""
    from recsys_mamba.training.run import optimized_value, train

    result = train(cfg)
    return optimized_value(result, str(result["optimized_metric"]))


if __name__ == "__main__":
    main()
