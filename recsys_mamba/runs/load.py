"""A trained run, loaded for inference without Lightning: its config, its prepared data and the model
with the checkpoint's weights, every piece checked against the others."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from recsys_mamba.config import register_resolvers
from recsys_mamba.data.cache import content_hash
from recsys_mamba.errors import RecsysError
from recsys_mamba.models.model import RecModel
from recsys_mamba.models.transitions import TransitionTable
from recsys_mamba.runs.build import build_model
from recsys_mamba.runs.checkpoint import (
    DATA_HASH,
    METADATA_KEY,
    VOCABULARY_KEY,
    check_expected,
    check_targets,
    read_checkpoint,
)
from recsys_mamba.sequences.prepared import PreparedData
from recsys_mamba.sequences.vocabulary import Vocabulary
from recsys_mamba.tasks import Task, get_task
from recsys_mamba.tasks.base import DataSettings, HeadInputs

CONFIG = "config.yaml"


def check_cuda(device: str) -> None:
    """A RecsysError unless `device` (cuda or cuda:N) is a GPU this process can use."""
    if not torch.cuda.is_available():
        raise RecsysError(
            f"device={device}: this machine has no CUDA GPU that torch can use ({torch.__version__}); set "
            "device=cpu, or install a CUDA build of torch on a GPU machine"
        )
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise RecsysError(
            f"device={device}: only {torch.cuda.device_count()} GPU(s) here (cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}); pick one of them"
        )


Data = PreparedData | Vocabulary  # what a Run scores with: a prepared folder, or its model's vocabulary


@dataclass
class Run:
    """A checkpoint or bundle ready to score: `model` is in eval mode, on the CPU unless moved (`to`).
    `data` is the prepared folder when one was given (or the checkpoint predates carried vocabularies),
    else the vocabulary the checkpoint or bundle carries: enough to score, not to evaluate
    (`prepared_data`)."""

    ckpt_path: Path
    config: DictConfig
    metadata: dict[str, Any]
    task: Task
    data: Data
    model: RecModel
    max_len: int

    @property
    def device(self) -> torch.device:
        """Where the model is: the inference paths put their inputs there and bring the scores back."""
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Run:
        """The model moved to `device` (e.g. "cuda"); this run, for chaining."""
        if torch.device(device).type == "cuda":
            check_cuda(str(device))
        self.model.to(torch.device(device))
        return self

    def data_settings(self) -> DataSettings:
        """How the run cut its data into samples (its `datamodule` settings)."""
        return data_settings(self.config, self.max_len)

    @property
    def vocabulary(self) -> Vocabulary:
        return self.data.vocabulary() if isinstance(self.data, PreparedData) else self.data

    def prepared_data(self) -> PreparedData:
        """The prepared folder (sequences and splits), for what needs more than the vocabulary (evaluation,
        the candidates' default histories): the one given, else the one the run trained on when its config
        can still find or rebuild it here; a RecsysError naming `prepared=` otherwise."""
        if isinstance(self.data, PreparedData):
            return self.data
        try:
            folder = prepared_folder(self.config)
        except (RecsysError, OSError, KeyError, ValueError, AttributeError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise RecsysError(
                f"{self.ckpt_path} carries its model and item table but not its data, and the data it was "
                f"trained on cannot be found here ({reason}); pass prepared=<a folder prepared from the same "
                "data> (python -m recsys_mamba.prepare data=... out_dir=...)"
            ) from None
        data = PreparedData.open(folder)
        check_data(self.ckpt_path, self.metadata, data)
        self.data = data
        return data


def data_settings(cfg: DictConfig, max_len: int | None = None) -> DataSettings:
    dm = cfg.datamodule
    return DataSettings(
        max_len=int(max_len or dm.max_len),
        positive_targets=bool(dm.get("positive_targets", True)),
        next_item_windows=bool(dm.get("next_item_windows", True)),
        ctr_train_windows=bool(dm.get("ctr_train_windows", True)),
        train_on_valid=bool(dm.get("train_on_valid", False)),
    )


def run_folder(ckpt_path: Path) -> Path:
    """`<run>/checkpoints/x.ckpt` -> `<run>` (where train wrote config.yaml and metrics.json)."""
    return ckpt_path.resolve().parent.parent


def _vetted(cfg: DictConfig, source: Path | str) -> DictConfig:
    # Only the model and the head are instantiated here; nothing else of the config may run code.
    for key in ("model", "head"):
        if key in cfg:
            check_targets(cfg[key], source, at=key)
    return cfg


def run_config(ckpt: Path, metadata: dict[str, Any] | None = None) -> DictConfig:
    """The config `train` wrote into the run folder (<run>/config.yaml with the checkpoint in
    <run>/checkpoints, or beside the checkpoint); without one, the resolved config the checkpoint
    carries in its `metadata`, so a checkpoint copied on its own still loads."""
    register_resolvers()
    for folder in (run_folder(ckpt), ckpt.resolve().parent):
        config = folder / CONFIG
        if config.is_file():
            cfg = OmegaConf.load(config)
            if not isinstance(cfg, DictConfig):
                raise RecsysError(f"{config} is not a run config (a YAML mapping); restore train's one")
            return _vetted(cfg, config)
    embedded = (metadata or {}).get("config")
    if isinstance(embedded, dict) and {"model", "head", "task"} <= set(embedded):
        return _vetted(OmegaConf.create(embedded), f"{ckpt} (its embedded config)")
    raise RecsysError(
        f"no config.yaml beside checkpoint {ckpt} (looked in {run_folder(ckpt)} and "
        f"{ckpt.resolve().parent}) and the checkpoint carries no run config (it was written by an older "
        "recsys-mamba); keep it inside its run folder, or retrain with this version"
    )


def prepared_folder(cfg: DictConfig, prepared: str | Path | None = None) -> Path:
    """The given prepared folder, else the one the run trained on (its prepared_dir or the data cache)."""
    if prepared:
        return Path(prepared)
    if cfg.datamodule.get("prepared_dir"):
        return Path(cfg.datamodule.prepared_dir)
    from recsys_mamba.data import prepare

    data = OmegaConf.to_container(cfg.data, resolve=True)
    return Path(prepare(data, cache_dir=OmegaConf.select(cfg, "paths.cache_dir")))


def legacy_data_hash(manifest: dict[str, Any]) -> str | None:
    """The data hash checkpoints written before content hashing carry: of the prepared folder's
    config, source paths included."""
    spec = manifest.get("config")
    if not isinstance(spec, dict):
        return None
    return content_hash({k: v for k, v in spec.items() if not (k == "item_attributes" and v is None)})


def check_data(path: Path, metadata: dict[str, Any], data: PreparedData | Vocabulary) -> None:
    """Refuse data another model was trained on: its data hash (from content) and its item count."""
    manifest = data.manifest
    want = manifest.get("config_hash")
    if metadata.get("data_hash") != DATA_HASH and isinstance(data, PreparedData):
        want = legacy_data_hash(manifest) or want
    check_expected(path, metadata, {"n_items": data.sizes["n_items"], "data_config_hash": want})


def _submodule_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def assemble(
    path: Path, cfg: DictConfig, state: dict[str, torch.Tensor], data: Data, describe: str
) -> RecModel:
    """The model `cfg` describes, sized by `data`, with the weights of `state` (encoder.*, head.*)."""
    n_items = data.sizes["n_items"]
    trained = state.get("encoder.item_emb.weight")
    if trained is None or trained.shape[0] - 1 != n_items:
        got = None if trained is None else trained.shape[0] - 1
        where = getattr(data, "folder", None) or "its item table"
        raise RecsysError(
            f"{path} was trained on {got} items but the data at {where} has {n_items}: it belongs to "
            "another data set; pass prepared=<the folder it was trained on>"
        )
    # The training data's transition counts travel with the weights: size the table to load them.
    saved_pairs = state.get("head.transitions.keys")
    n_pairs = 0 if saved_pairs is None else saved_pairs.numel()
    # So are the user embeddings of a head that has them: as many as the training data had users.
    user_emb = state.get("head.user_emb.weight")
    inputs = HeadInputs(
        transitions=lambda: TransitionTable.empty(n_items, n_pairs),
        n_users=None if user_emb is None else (lambda: user_emb.shape[0] - 1),
    )
    model = build_model(cfg, data.encoder_inputs(), inputs)
    try:
        model.encoder.load_state_dict(_submodule_state(state, "encoder."))
        model.head.load_state_dict(_submodule_state(state, "head."))
    except RuntimeError as err:
        raise RecsysError(f"{path} does not fit the model its {describe} describes: {err}") from err
    return model.eval()


def load_checkpoint_run(
    ckpt_path: str | Path, prepared: str | Path | None = None, max_len: int | None = None
) -> Run:
    """A checkpoint's model with its weights and its config, refused with a message where the pieces
    do not belong together. Data: `prepared` when given; else the item table the checkpoint carries
    (a checkpoint from before carried item tables: the prepared folder its run trained on). Bundles
    and checkpoints alike: `runs.load_run`."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise RecsysError(
            f"ckpt_path={path} does not exist; pass a .ckpt file (e.g. <run>/checkpoints/last.ckpt) or a "
            "bundle folder written by python -m recsys_mamba.export"
        )
    saved = read_checkpoint(path)
    state, meta = saved["state_dict"], json.loads(saved[METADATA_KEY])
    cfg = run_config(path, meta)
    check_expected(
        path,
        meta,
        {"task": str(cfg.task.name), "model_target": OmegaConf.select(cfg, "model._target_", default=None)},
    )
    data: Data
    if prepared is None and VOCABULARY_KEY in saved:
        attributes = state.get("encoder.item_attributes")
        manifest = {"name": meta.get("data_name"), "config_hash": meta.get("data_config_hash")}
        data = Vocabulary.from_payload(
            saved[VOCABULARY_KEY], path, None if attributes is None else attributes.numpy(), manifest
        )
    else:
        data = PreparedData.open(prepared_folder(cfg, prepared))
    check_data(path, meta, data)
    model = assemble(path, cfg, state, data, "config.yaml")
    task = get_task(str(cfg.task.name))
    return Run(path, cfg, meta, task, data, model, int(max_len or cfg.model.max_len))
