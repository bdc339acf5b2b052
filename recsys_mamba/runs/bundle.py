"""A model that leaves its run: an exported bundle is a folder that loads on any machine with nothing
else, no run folder, data set, path or environment variable of the machine that trained it.

    model.json                  format and package version, task, the resolved model/head/data config
                                (source files by name and sha256, no paths), vocabulary sizes, event type
                                names, and the sha256 of every other file
    weights.safetensors         encoder.* and head.* weights (safetensors: loading runs no code)
    items.parquet               item_idx, item_id (original id), category_idx, count (training events)
    item_attributes.safetensors the (n_items + 1, K) attribute ids, when the model uses item attributes
    transitions.safetensors     the training transition counts (CSR), when the head uses them

Every file is checked against its sha256 on load; a bundle of a newer format is refused with the
version that reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from omegaconf import DictConfig, OmegaConf

from recsys_mamba.errors import RecsysError
from recsys_mamba.files import TMP_MARK, write_bytes_atomic
from recsys_mamba.runs.checkpoint import check_expected
from recsys_mamba.runs.load import Run, _vetted, assemble, check_data, load_checkpoint_run, prepared_folder
from recsys_mamba.sequences.prepared import PreparedData
from recsys_mamba.sequences.vocabulary import ItemTable, Vocabulary
from recsys_mamba.tasks import get_task
from recsys_mamba.version import __version__

BUNDLE_FORMAT = "recsys-mamba-bundle"
# Bump when a bundle written by this code can no longer be read by older code.
BUNDLE_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS = "weights.safetensors"
ITEMS = "items.parquet"
ATTRIBUTES = "item_attributes.safetensors"
TRANSITIONS = "transitions.safetensors"
_TABLES = {"encoder.item_attributes": (ATTRIBUTES, "item_attributes")}
_TRANSITION_PREFIX = "head.transitions."
# The run config's sections a bundle keeps: what builds and feeds the model (no paths, trainer, loggers).
_SECTIONS = ("model", "head", "task", "datamodule", "data")
_DATAMODULE_KEYS = (
    "max_len",
    "positive_targets",
    "next_item_windows",
    "ctr_train_windows",
    "train_on_valid",
    "eval_batch_size",
)
_ABSOLUTE = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\\\\)")


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MODEL_JSON).is_file()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _portable(node: Any) -> Any:
    """`node` with every absolute path replaced by its file name: a bundle names no place of the
    machine that trained it (sources are identified by the data hash, which is of their content)."""
    if isinstance(node, dict):
        return {k: _portable(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_portable(v) for v in node]
    if isinstance(node, str) and _ABSOLUTE.match(node):
        return Path(node).name
    return node


def bundle_config(run: Run) -> dict[str, Any]:
    """The run config's sections that build and feed the model, resolved, without paths."""
    cfg = OmegaConf.to_container(run.config, resolve=False)
    out: dict[str, Any] = {}
    for key in _SECTIONS:
        node = OmegaConf.select(run.config, key, default=None)
        if node is None:
            continue
        try:
            value = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        except Exception:  # an interpolation of the training machine (hydra:, oc.env) left as written
            value = cfg.get(key)  # type: ignore[union-attr]
        out[key] = value
    out["datamodule"] = {k: v for k, v in (out.get("datamodule") or {}).items() if k in _DATAMODULE_KEYS}
    out["datamodule"]["max_len"] = run.max_len
    return _portable(out)


def _split_state(run: Run) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The model's weights, and the data tables among its buffers, each to its own file."""
    weights, tables = {}, {}
    for name, tensor in run.model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        if name in _TABLES:
            file, key = _TABLES[name]
            tables.setdefault(file, {})[key] = tensor
        elif name.startswith(_TRANSITION_PREFIX):
            tables.setdefault(TRANSITIONS, {})[name[len(_TRANSITION_PREFIX) :]] = tensor
        else:
            weights[name] = tensor
    return weights, tables


def _items_frame(items: ItemTable) -> pl.DataFrame:
    n = items.n_items
    return pl.DataFrame(
        {
            "item_idx": np.arange(1, n + 1, dtype=np.int32),
            "item_id": [str(v) for v in items.ids[1:]],
            "category_idx": items.categories[1:].astype(np.int32),
            "count": items.counts[1:].astype(np.int64),
        },
        schema={"item_idx": pl.Int32, "item_id": pl.String, "category_idx": pl.Int32, "count": pl.Int64},
    )


def bundle_files(run: Run) -> dict[str, bytes]:
    """Every file of the bundle of `run`, by name (model.json last: it lists the others' sha256)."""
    from safetensors.torch import save

    weights, tables = _split_state(run)
    files = {WEIGHTS: save(weights, metadata={"format": BUNDLE_FORMAT})}
    for name, tensors in tables.items():
        files[name] = save(tensors)
    vocab = run.vocabulary
    buffer = _parquet_bytes(_items_frame(vocab.items))
    files[ITEMS] = buffer
    meta = run.metadata
    model = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "package_version": __version__,
        "task": run.task.name,
        "model_class": meta.get("model_class"),
        "head_class": meta.get("head_class"),
        "max_len": run.max_len,
        "config": bundle_config(run),
        "data": {
            "name": vocab.manifest.get("name") or meta.get("data_name"),
            "config_hash": meta.get("data_config_hash"),
            "data_hash": meta.get("data_hash"),
            **vocab.sizes,
            "event_types": list(vocab.event_type_names),
        },
        "checkpoint": {
            "format_version": meta.get("format_version"),
            "package_version": meta.get("package_version"),
            "state_dict_sha256": meta.get("state_dict_sha256"),
        },
        "files": {name: sha256_bytes(data) for name, data in files.items()},
    }
    files[MODEL_JSON] = (json.dumps(model, indent=2, sort_keys=True, default=str) + "\n").encode()
    return files


def _parquet_bytes(frame: pl.DataFrame) -> bytes:
    import io

    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


EXPORT_HINT = "free disk space or choose another out_dir=; the folder there is unchanged"


def export_bundle(run: Run, out_dir: str | Path) -> Path:
    """Write the bundle of `run` to `out_dir`: into a temporary sibling folder, every file synced, then
    renamed into place, so `out_dir` holds either its previous content or the whole new bundle."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RecsysError(f"out_dir={out} is a file; pass a folder for the bundle")
    if out.is_dir() and any(out.iterdir()) and not is_bundle(out):
        raise RecsysError(
            f"out_dir={out} holds files that are not a model bundle; choose an empty or new folder"
        )
    files = bundle_files(run)
    tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as err:
        reason = err.strerror or err
        raise RecsysError(f"cannot create the bundle folder {out} ({reason}); {EXPORT_HINT}") from err
    try:
        for name, data in files.items():
            write_bytes_atomic(tmp / name, data, hint=EXPORT_HINT)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old{TMP_MARK}{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---- loading ----------------------------------------------------------------------------------------


def _refuse(path: Path, why: str) -> RecsysError:
    return RecsysError(
        f"bundle {path}: {why}; it was NOT loaded: export it again (python -m recsys_mamba.export "
        "ckpt_path=<run>/checkpoints/last.ckpt out_dir=...) and copy the whole folder"
    )


def read_model_json(path: Path) -> dict[str, Any]:
    """model.json of the bundle at `path`, its format and version checked."""
    file = path / MODEL_JSON
    try:
        model = json.loads(file.read_text())
    except FileNotFoundError:
        raise RecsysError(
            f"{path} is a folder without {MODEL_JSON}: not a model bundle; pass a bundle folder written by "
            "python -m recsys_mamba.export, or a .ckpt file"
        ) from None
    except (OSError, ValueError) as err:
        raise _refuse(path, f"its {MODEL_JSON} cannot be read ({err})") from None
    if not isinstance(model, dict) or model.get("format") != BUNDLE_FORMAT:
        raise _refuse(path, f"its {MODEL_JSON} is not a {BUNDLE_FORMAT} description")
    version = model.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _refuse(path, f"unknown bundle format version {version!r}")
    if version > BUNDLE_VERSION:
        raise RecsysError(
            f"bundle {path} has bundle format {version}, written by recsys-mamba "
            f"{model.get('package_version')}; this recsys-mamba {__version__} reads format {BUNDLE_VERSION} "
            "at most: upgrade recsys-mamba (pip install -U recsys-mamba) to load it"
        )
    return model


def _read_checked(path: Path, model: dict[str, Any], name: str) -> bytes:
    want = (model.get("files") or {}).get(name)
    if want is None:
        raise _refuse(path, f"{MODEL_JSON} lists no sha256 for {name}")
    try:
        data = (path / name).read_bytes()
    except OSError as err:
        raise _refuse(path, f"{name} cannot be read ({err.strerror or err})") from None
    if sha256_bytes(data) != want:
        raise _refuse(path, f"{name} does not match its sha256 in {MODEL_JSON} (truncated, damaged, altered)")
    return data


def _tensors(path: Path, model: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(_read_checked(path, model, name))
    except SafetensorError as err:
        raise _refuse(path, f"{name} is not a safetensors file ({err})") from None


def bundle_vocabulary(path: Path, model: dict[str, Any], attributes: np.ndarray | None) -> Vocabulary:
    import io

    data = model.get("data") or {}
    try:
        frame = pl.read_parquet(io.BytesIO(_read_checked(path, model, ITEMS)))
        n_items = int(data["n_items"])
        items = ItemTable.from_frame(frame, n_items)
        names = [str(n) for n in data.get("event_types") or []]
        n_categories = int(data.get("n_categories") or 0)
    except (KeyError, TypeError, ValueError, pl.exceptions.PolarsError) as err:
        raise _refuse(path, f"its item table or data description is incomplete ({err!r})") from None
    manifest = {"name": data.get("name"), "config_hash": data.get("config_hash")}
    return Vocabulary(items, names, n_categories, attributes, manifest)


def load_bundle(path: str | Path, prepared: str | Path | None = None, max_len: int | None = None) -> Run:
    """The bundle's model in eval mode, with its vocabulary as data (or `prepared`, a prepared folder of
    the same data, for evaluation), every file checked against its sha256."""
    path = Path(path)
    model_json = read_model_json(path)
    files = model_json.get("files") or {}
    for name in files:
        if name != Path(name).name or name == MODEL_JSON:
            raise _refuse(path, f"{MODEL_JSON} lists a file {name!r} outside the bundle")
    state = dict(_tensors(path, model_json, WEIGHTS))
    attributes = None
    if ATTRIBUTES in files:
        table = _tensors(path, model_json, ATTRIBUTES)["item_attributes"]
        state["encoder.item_attributes"] = table
        attributes = table.numpy()
    if TRANSITIONS in files:
        for key, tensor in _tensors(path, model_json, TRANSITIONS).items():
            state[_TRANSITION_PREFIX + key] = tensor
    cfg = OmegaConf.create(model_json.get("config") or {})
    if not {"model", "head", "task"} <= set(cfg):
        raise _refuse(path, f"its {MODEL_JSON} holds no model, head and task config")
    _vetted(cfg, path / MODEL_JSON)
    meta = {
        "task": model_json.get("task"),
        "model_target": OmegaConf.select(cfg, "model._target_", default=None),
        "data_name": (model_json.get("data") or {}).get("name"),
        "data_config_hash": (model_json.get("data") or {}).get("config_hash"),
        "data_hash": (model_json.get("data") or {}).get("data_hash"),
        "n_items": (model_json.get("data") or {}).get("n_items"),
        "format_version": model_json.get("format_version"),
        "package_version": model_json.get("package_version"),
        "model_class": model_json.get("model_class"),
        "head_class": model_json.get("head_class"),
    }
    check_expected(path, meta, {"task": str(cfg.task.name)})
    data: PreparedData | Vocabulary = bundle_vocabulary(path, model_json, attributes)
    if prepared is not None:
        data = PreparedData.open(prepared_folder(cfg, prepared))
        check_data(path, meta, data)
    model = assemble(path, cfg, state, data, MODEL_JSON)
    task = get_task(str(cfg.task.name))
    max_len = int(max_len or model_json.get("max_len") or cfg.model.max_len)
    return Run(path, cfg, meta, task, data, model, max_len)


def load_run(ckpt_path: str | Path, prepared: str | Path | None = None, max_len: int | None = None) -> Run:
    """An exported bundle's (a folder with model.json) or a checkpoint's model with its weights and
    config, refused with a message where the pieces do not belong together. Data: `prepared` when
    given; else the item table the bundle or checkpoint carries (a checkpoint from before carried item
    tables: the prepared folder its run trained on)."""
    if Path(ckpt_path).is_dir():
        return load_bundle(ckpt_path, prepared, max_len)
    return load_checkpoint_run(ckpt_path, prepared, max_len)
