"""Value checks of the train config (model, head, trainer, optimiser, data module, paths), run by
`recsys_mamba.training.run.validate_config` before any data is read or a model is built."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from recsys_mamba import checks
from recsys_mamba.errors import RecsysError

# model key -> (minimum, example); only the keys the chosen model has are checked
_MODEL_INTS = {
    "d_model": (1, 64),
    "n_layers": (1, 2),
    "d_state": (1, 16),
    "d_conv": (2, 4),
    "expand": (1, 2),
    "ffn_mult": (1, 4),
    "n_heads": (1, 2),
}
_MODEL_BOOLS = ("gradient_checkpointing", "ffn", "scale_embeddings")
_LIMIT = 1 << 20  # widths beyond this cannot be allocated anyway; refuse before trying


def _get(cfg: DictConfig, key: str) -> Any:
    return checks.select(cfg, key, default=None)


def _present(cfg: DictConfig, key: str) -> bool:
    group, _, name = key.rpartition(".")
    node = checks.select(cfg, group, default=None) if group else cfg
    return isinstance(node, dict | DictConfig) and name in node


def check_model(cfg: DictConfig, prefix: str = "model") -> None:
    """The encoder config at `prefix` (`model`, or `models.<name>` in the scoring benchmark)."""

    def key(name: str) -> str:
        return f"{prefix}.{name}"

    for name, (minimum, example) in _MODEL_INTS.items():
        if _present(cfg, key(name)):
            checks.integer(_get(cfg, key(name)), key(name), minimum=minimum, maximum=_LIMIT, example=example)
    checks.integer(_get(cfg, key("max_len")), key("max_len"), minimum=1, maximum=1 << 24, example=200)
    if _present(cfg, key("dropout")):
        checks.number(_get(cfg, key("dropout")), key("dropout"), minimum=0, below=1, example=0.2)
    for name in _MODEL_BOOLS:
        if _present(cfg, key(name)):
            checks.boolean(_get(cfg, key(name)), key(name))
    if _present(cfg, key("n_heads")) and _get(cfg, key("d_model")) % _get(cfg, key("n_heads")):
        raise RecsysError(
            f"{key('d_model')}={_get(cfg, key('d_model'))} must be divisible by "
            f"{key('n_heads')}={_get(cfg, key('n_heads'))}"
        )
    if _present(cfg, key("dt_min")):
        lo = checks.number(_get(cfg, key("dt_min")), key("dt_min"), above=0, example=0.001)
        hi = checks.number(_get(cfg, key("dt_max")), key("dt_max"), above=0, example=0.1)
        if lo > hi:  # type: ignore[operator]
            raise RecsysError(f"{key('dt_min')}={lo} must not exceed {key('dt_max')}={hi}")
    if _present(cfg, key("dt_rank")) and _get(cfg, key("dt_rank")) != "auto":
        checks.integer(_get(cfg, key("dt_rank")), key("dt_rank"), minimum=1, maximum=_LIMIT, example="auto")
    if _present(cfg, key("norm")):
        checks.choice(_get(cfg, key("norm")), key("norm"), ("rmsnorm", "layernorm"))
    if _present(cfg, key("scan_backend")):
        from recsys_mamba.ops import BACKENDS

        checks.choice(_get(cfg, key("scan_backend")), key("scan_backend"), BACKENDS)


def check_head(cfg: DictConfig) -> None:
    if _present(cfg, "head.loss"):
        checks.choice(_get(cfg, "head.loss"), "head.loss", ("ce", "sampled"))
    if _present(cfg, "head.n_negatives"):
        checks.integer(
            _get(cfg, "head.n_negatives"), "head.n_negatives", minimum=1, maximum=_LIMIT, example=1024
        )
    for name in ("logq", "mask_history", "seen_bias", "target_attention"):
        if _present(cfg, f"head.{name}"):
            checks.boolean(_get(cfg, f"head.{name}"), f"head.{name}")
    if _present(cfg, "head.mlp_dims"):
        dims = _get(cfg, "head.mlp_dims")
        if not isinstance(dims, list):
            raise RecsysError(f"head.mlp_dims={dims!r} must be a list of widths, e.g. head.mlp_dims=[200,80]")
        for i, d in enumerate(dims):
            checks.integer(d, f"head.mlp_dims[{i}]", minimum=1, maximum=_LIMIT, example=80)
    if _present(cfg, "head.dropout"):
        checks.number(_get(cfg, "head.dropout"), "head.dropout", minimum=0, below=1, example=0.1)
    if _present(cfg, "head.attention_dim"):
        checks.integer(_get(cfg, "head.attention_dim"), "head.attention_dim", minimum=1, maximum=_LIMIT)
    if _present(cfg, "head.base_rate"):
        checks.number(_get(cfg, "head.base_rate"), "head.base_rate", above=0, below=1, optional=True)


def _limit_batches(cfg: DictConfig, key: str) -> None:
    value = _get(cfg, key)
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return
    checks.number(value, key, minimum=0, maximum=1, example=0.1)  # a fraction of the batches


def check_trainer(cfg: DictConfig) -> None:
    max_epochs = checks.integer(_get(cfg, "trainer.max_epochs"), "trainer.max_epochs", minimum=-1, example=20)
    if max_epochs == 0:
        raise RecsysError("trainer.max_epochs=0 trains nothing; use a positive number (or -1: no limit)")
    checks.integer(_get(cfg, "trainer.min_epochs"), "trainer.min_epochs", minimum=0, optional=True)
    checks.number(
        _get(cfg, "trainer.gradient_clip_val"), "trainer.gradient_clip_val", minimum=0, optional=True
    )
    checks.integer(
        _get(cfg, "trainer.check_val_every_n_epoch"),
        "trainer.check_val_every_n_epoch",
        minimum=1,
        optional=True,
    )
    checks.integer(_get(cfg, "trainer.num_sanity_val_steps"), "trainer.num_sanity_val_steps", minimum=-1)
    checks.integer(
        _get(cfg, "trainer.log_every_n_steps"), "trainer.log_every_n_steps", minimum=1, optional=True
    )
    for split in ("train", "val", "test"):
        _limit_batches(cfg, f"trainer.limit_{split}_batches")
    fast = _get(cfg, "trainer.fast_dev_run")
    if not isinstance(fast, bool):
        checks.integer(fast, "trainer.fast_dev_run", minimum=0, example="true")
    checks.boolean(_get(cfg, "trainer.enable_progress_bar"), "trainer.enable_progress_bar")
    devices = _get(cfg, "trainer.devices")
    if not isinstance(devices, str | list) and devices is not None:
        checks.integer(devices, "trainer.devices", minimum=-1, example=1)


def check_module(cfg: DictConfig) -> None:
    checks.number(_get(cfg, "module.optimizer.lr"), "module.optimizer.lr", above=0, example=0.001)
    if _present(cfg, "module.optimizer.weight_decay"):
        checks.number(_get(cfg, "module.optimizer.weight_decay"), "module.optimizer.weight_decay", minimum=0)
    if _present(cfg, "module.optimizer.betas"):
        betas = _get(cfg, "module.optimizer.betas")
        if not isinstance(betas, list) or len(betas) != 2:
            raise RecsysError(f"module.optimizer.betas={betas!r} must be two numbers, e.g. [0.9,0.98]")
        for i, b in enumerate(betas):
            checks.number(b, f"module.optimizer.betas[{i}]", minimum=0, below=1, example=0.9)
    for name in ("warmup_frac", "min_lr_ratio"):
        key = f"module.scheduler.{name}"
        if _present(cfg, key):
            checks.number(_get(cfg, key), key, minimum=0, maximum=1, example=0.1)


def check_datamodule(cfg: DictConfig) -> None:
    checks.integer(_get(cfg, "datamodule.num_workers"), "datamodule.num_workers", minimum=0, maximum=1024)
    pin = _get(cfg, "datamodule.pin_memory")
    if pin is not None:
        checks.boolean(pin, "datamodule.pin_memory")
    for name in ("ctr_train_windows", "next_item_windows", "positive_targets", "bucket_by_length"):
        if _present(cfg, f"datamodule.{name}"):
            checks.boolean(_get(cfg, f"datamodule.{name}"), f"datamodule.{name}")
    checks.output_dir(_get(cfg, "paths.cache_dir"), "paths.cache_dir")
    if _get(cfg, "datamodule.cache_dir") is not None:
        checks.output_dir(_get(cfg, "datamodule.cache_dir"), "datamodule.cache_dir")
    prepared = checks.path(_get(cfg, "datamodule.prepared_dir"), "datamodule.prepared_dir", optional=True)
    if prepared is not None:
        if not (prepared / "manifest.json").is_file():
            raise RecsysError(
                f"datamodule.prepared_dir={prepared} holds no manifest.json; point it at a folder written by "
                "python -m recsys_mamba.prepare, or set it to null"
            )
        return
    from recsys_mamba.data.spec import check_source, normalize

    check_source(normalize(checks.select(cfg, "data")))


def check_all(cfg: DictConfig) -> None:
    """Every value check of the train config; raises `RecsysError` naming the first bad key."""
    checks.seed(_get(cfg, "seed"), "seed")
    checks.boolean(_get(cfg, "train"), "train")
    checks.boolean(_get(cfg, "test"), "test")
    check_model(cfg)
    check_head(cfg)
    check_trainer(cfg)
    check_module(cfg)
    check_datamodule(cfg)
