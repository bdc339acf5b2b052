"""`python -m recsys_mamba.serve model=DIR port=8000 state_store=sqlite:///PATH/state.db`: the online
service (`recsys_mamba.serving`) on uvicorn. `model=` is read as `model_path=` (conf/serve.yaml)."""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from recsys_mamba import checks
from recsys_mamba.config import hydra_entry
from recsys_mamba.errors import RecsysError
from recsys_mamba.schema import Bool, Check, Choice, Int, PathTo, Rule, Schema, Text


def _required(cfg: DictConfig) -> None:
    if checks.select(cfg, "model_path", default=None) in (None, ""):
        raise RecsysError(
            "model=... is required: a bundle folder or a .ckpt, e.g. python -m recsys_mamba.serve model=DIR"
        )


# Every value of conf/serve.yaml, checked before the model is loaded.
SERVE = Schema(
    Check(_required),
    Rule("model_path", PathTo("exists", what="a bundle folder (python -m recsys_mamba.export) or a .ckpt")),
    Rule("host", Text(example="127.0.0.1")),
    Rule("port", Int(0, 65535, example=8000)),
    Rule("state_store", Text(example="sqlite:///PATH/state.db")),
    Rule("redis_appendfsync", Choice(("always", "everysec", "no"))),
    Rule("sqlite_synchronous", Choice(("full", "normal"))),
    Rule("unknown_items", Choice(("ignore", "reject"))),
    Rule("exclude_seen", Bool()),
    Rule("max_batch_events", Int(1, 1 << 20, example=1000)),
    Rule("max_body_bytes", Int(1024, 1 << 30, example=1048576)),
    Rule("write_batch_events", Int(1, 1 << 20, example=4096)),
    Rule("cache_mb", Int(0, 1 << 24, example=256)),
    Rule("threads", Int(1, 1024, example=1)),
    Rule("log_level", Choice(("critical", "error", "warning", "info", "debug"))),
)


def validate_config(cfg: DictConfig) -> None:
    SERVE.validate(cfg)


def build(cfg: DictConfig):  # -> fastapi.FastAPI (imported late: --help needs no web stack)
    """The app `cfg` describes, its model loaded and its store opened (errors here stop the start)."""
    import torch

    from recsys_mamba.serving.app import build_app
    from recsys_mamba.serving.service import Service, Settings

    validate_config(cfg)
    torch.set_num_threads(int(cfg.threads))
    settings = Settings(
        unknown_items=cfg.unknown_items,
        exclude_seen=bool(cfg.exclude_seen),
        max_batch_events=int(cfg.max_batch_events),
        max_body_bytes=int(cfg.max_body_bytes),
        write_batch_events=int(cfg.write_batch_events),
        cache_mb=int(cfg.cache_mb),
        redis_appendfsync=cfg.redis_appendfsync,
        sqlite_synchronous=cfg.sqlite_synchronous,
    )
    return build_app(Service.open(cfg.model_path, str(cfg.state_store), settings))


@hydra_entry("serve")
def main(cfg: DictConfig) -> None:
    import uvicorn

    app = build(cfg)
    print(f"serving {cfg.model_path} on http://{cfg.host}:{cfg.port} (state: {cfg.state_store})", flush=True)
    uvicorn.run(app, host=cfg.host, port=int(cfg.port), log_level=cfg.log_level, access_log=False)


def with_model_alias(argv: list[str]) -> list[str]:
    """`model=X` as `model_path=X`: the command the README gives, which Hydra alone would refuse."""
    return [f"model_path={a[len('model='):]}" if a.startswith("model=") else a for a in argv]


if __name__ == "__main__":
    sys.argv[1:] = with_model_alias(sys.argv[1:])
    main()
