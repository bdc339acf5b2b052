"""`python -m recsys_mamba.export ckpt_path=RUN/checkpoints/X.ckpt out_dir=DIR`: a checkpoint as a
self-contained model bundle (`runs.bundle`): loads anywhere with `Recommender.load(DIR)`, scores with
`python -m recsys_mamba.score ckpt_path=DIR`, serves with `python -m recsys_mamba.serve model=DIR`."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from recsys_mamba import checks
from recsys_mamba.config import hydra_entry
from recsys_mamba.errors import RecsysError
from recsys_mamba.schema import Check, Int, PathTo, Rule, Schema


def _required(cfg: DictConfig) -> None:
    for key in ("ckpt_path", "out_dir"):
        if checks.select(cfg, key, default=None) in (None, ""):
            raise RecsysError(f"{key}=... is required, e.g. python -m recsys_mamba.export {key}=PATH")


# Every value of conf/export.yaml, checked before the checkpoint is read.
EXPORT = Schema(
    Check(_required),
    Rule("ckpt_path", PathTo("exists", what="a .ckpt file from a train run, or a bundle folder")),
    Rule("out_dir", PathTo("out_dir")),
    Rule("prepared", PathTo("prepared", optional=True)),
    Rule("max_len", Int(1, 1 << 24, optional=True, example=200)),
)


def validate_config(cfg: DictConfig) -> None:
    EXPORT.validate(cfg)


def export(cfg: DictConfig) -> Path:
    from recsys_mamba.runs import load_run
    from recsys_mamba.runs.bundle import export_bundle

    validate_config(cfg)
    run = load_run(cfg.ckpt_path, cfg.prepared, cfg.max_len)
    return export_bundle(run, cfg.out_dir)


@hydra_entry("export")
def main(cfg: DictConfig) -> Path:
    out = export(cfg)
    print(f"exported -> {out}")
    return out


if __name__ == "__main__":
    main()
