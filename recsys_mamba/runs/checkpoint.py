"""Checkpoints that are safe to load: JSON metadata, weights-only reads, atomic writes, vetted configs.

Loading never unpickles Python objects (`torch.load(weights_only=True)`); what a checkpoint says about
itself (format version, task, model, data) is embedded under `"recsys_mamba"` as a JSON string. Pure
torch: serving a model never needs Lightning (`training.checkpoint_io` plugs this into a Trainer).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn

from recsys_mamba.errors import RecsysError
from recsys_mamba.files import write_bytes_atomic
from recsys_mamba.sequences.vocabulary import payload_digest
from recsys_mamba.version import __version__

# Bump when a checkpoint written by this code can no longer be read by older code.
FORMAT_VERSION = 1
METADATA_KEY = "recsys_mamba"
# The item table (original ids, categories, counts) and event type names, so a checkpoint alone scores.
VOCABULARY_KEY = "recsys_mamba_vocabulary"
# How `data_config_hash` was computed: from the sources' content (checkpoints without it: from paths).
DATA_HASH = "content"
_OTHER_DATA = (
    "it belongs to another data set; pass prepared=<the folder it was trained on> "
    "(or the data=/datamodule.prepared_dir= it was trained with)"
)
# Metadata fields a loader can require to equal its own run's, with how to fix a mismatch.
EXPECTABLE = {
    "task": "use the task it was trained for (task=...) or a checkpoint trained for this task",
    "model_target": "use the model it was trained with (model=...) or a checkpoint of this model",
    "n_items": _OTHER_DATA,
    "n_categories": _OTHER_DATA,
    "data_config_hash": _OTHER_DATA,
}
# `_target_`s a saved run config may instantiate: dotted prefixes, and exact names.
ALLOWED_TARGET_PREFIXES = (
    "recsys_mamba.",
    "torch.optim.",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
    "lightning.pytorch.trainer.",
)
ALLOWED_TARGETS = ("lightning.pytorch.Trainer", "lightning.Trainer")


# ---- metadata ---------------------------------------------------------------------------------------


def _plain(node: Any, skip: tuple[str, ...] = ()) -> Any:
    """A config as plain dicts/lists, each value resolved where it can be, else kept as written."""
    if isinstance(node, DictConfig | ListConfig):
        raw = OmegaConf.to_container(node, resolve=False)
        keys = [k for k in node.keys() if k not in skip] if isinstance(node, DictConfig) else range(len(node))
        out = {str(k): _plain(_value(node, k, raw[k])) for k in keys}  # type: ignore[index]
        return out if isinstance(node, DictConfig) else list(out.values())
    return node


def _value(node: DictConfig | ListConfig, key: Any, raw: Any) -> Any:
    try:
        return node[key]
    except Exception:  # an interpolation that cannot resolve here (e.g. ${hydra:...}): keep its text
        return raw


def _qualname(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def run_metadata(
    cfg: DictConfig, sizes: dict[str, int], manifest: dict[str, Any], encoder: nn.Module, head: nn.Module
) -> dict[str, Any]:
    """What a checkpoint of this run says about itself (without the weights' digest)."""
    return {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "task": str(OmegaConf.select(cfg, "task.name", default="")),
        "model_target": OmegaConf.select(cfg, "model._target_", default=None),
        "model_class": _qualname(encoder),
        "head_class": _qualname(head),
        "n_items": int(sizes["n_items"]),
        "n_categories": int(sizes.get("n_categories") or 0),
        "data_name": manifest.get("name"),
        "data_config_hash": manifest.get("config_hash"),
        "data_hash": DATA_HASH,
        "config": _plain(cfg, skip=("hydra",)),
    }


def expected(metadata: dict[str, Any]) -> dict[str, Any]:
    """The fields of `metadata` a checkpoint loaded into the same run must match."""
    return {key: metadata.get(key) for key in EXPECTABLE}


# Weight sets a checkpoint may hold, each with its digest: the weights, and with weight averaging
# (callbacks=ema) the raw weights Lightning keeps beside the averaged ones, which resuming loads.
WEIGHT_KEYS = ("state_dict", "current_model_state")


def state_digest(state_dict: dict[str, Tensor]) -> str:
    """SHA-256 over the weights (names, dtypes, shapes, bytes): catches weights changed after saving."""
    sha = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        sha.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


# ---- reading ----------------------------------------------------------------------------------------


def _refused(path: Any, err: BaseException) -> RecsysError:
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if isinstance(err, pickle.UnpicklingError) and found:
        return RecsysError(
            f"checkpoint {path} holds pickled Python objects ({found.group(1)}) and was NOT loaded: "
            "unpickling them could run arbitrary code. It was written by an older recsys-mamba version "
            f"(before checkpoint format {FORMAT_VERSION}, which pickled the optimizer settings) or it has "
            "been tampered with; retrain it with this version (python -m recsys_mamba.train ...), and "
            "delete it if you do not know where it came from"
        )
    if isinstance(err, EOFError):
        reason = "the file is empty or ends early"
    elif isinstance(err, pickle.UnpicklingError):
        reason = "its contents are not a PyTorch checkpoint"
    else:
        reason = text.split(". ")[0][:200]
    return RecsysError(
        f"checkpoint {path} is truncated or corrupted ({reason}) and was NOT loaded; it may have been "
        "cut off by an interrupted copy or save, or tampered with: copy it again, or use another "
        "checkpoint of the run (e.g. <run>/checkpoints/last.ckpt) or retrain"
    )


def _check_metadata(path: Any, saved: Any, expect: dict[str, Any] | None) -> dict[str, Any]:
    if not isinstance(saved, dict) or not isinstance(saved.get("state_dict"), dict):
        raise RecsysError(
            f"checkpoint {path} holds no state_dict: it is not a Lightning checkpoint written by "
            "python -m recsys_mamba.train; pass a <run>/checkpoints/*.ckpt file"
        )
    raw = saved.get(METADATA_KEY)
    if raw is None:
        raise RecsysError(
            f"checkpoint {path} has no checkpoint format version (no {METADATA_KEY!r} metadata): it was "
            f"written by a recsys-mamba version before checkpoint format {FORMAT_VERSION} or by another "
            "program; retrain it with this version (python -m recsys_mamba.train ...)"
        )
    try:
        meta = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise RecsysError(
            f"checkpoint {path}: its {METADATA_KEY!r} metadata is not a JSON object, so the file is "
            "corrupted or was tampered with; it was NOT used: use another checkpoint or retrain"
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RecsysError(
            f"checkpoint {path} has an unknown checkpoint format version {version!r} (this recsys-mamba "
            f"{__version__} reads format {FORMAT_VERSION}); retrain it with this version"
        )
    if version > FORMAT_VERSION:
        raise RecsysError(
            f"checkpoint {path} has checkpoint format {version}, written by recsys-mamba "
            f"{meta.get('package_version')}; this recsys-mamba {__version__} reads format "
            f"{FORMAT_VERSION} at most: upgrade recsys-mamba (pip install -U recsys-mamba) to load it"
        )
    for key in WEIGHT_KEYS:
        digest = meta.get(f"{key}_sha256")
        if digest is not None and (key not in saved or digest != state_digest(saved[key])):
            raise RecsysError(
                f"checkpoint {path}: its weights ({key}) do not match the digest recorded when it was "
                "saved, so the file is corrupted or was tampered with; it was NOT used: use another "
                "checkpoint or retrain"
            )
    vocabulary = saved.get(VOCABULARY_KEY)
    if vocabulary is not None and meta.get("vocabulary_sha256") != _vocabulary_digest(path, vocabulary):
        raise RecsysError(
            f"checkpoint {path}: its item table does not match the digest recorded when it was saved, so "
            "the file is corrupted or was tampered with; it was NOT used: use another checkpoint or retrain"
        )
    check_expected(path, meta, expect)
    return meta


def _vocabulary_digest(path: Any, payload: Any) -> str | None:
    try:
        return payload_digest(payload)
    except (KeyError, TypeError, AttributeError, ValueError):
        return None


def check_expected(path: Any, metadata: dict[str, Any], expect: dict[str, Any] | None) -> None:
    """Refuse a checkpoint whose metadata differs from `expect` (fields unknown on either side pass)."""
    for key, want in (expect or {}).items():
        got = metadata.get(key)
        if want is not None and got is not None and got != want:
            raise RecsysError(
                f"checkpoint {path} was trained with {key}={got!r} but is being loaded for {key}={want!r}: "
                f"{EXPECTABLE.get(key, 'use a checkpoint of this run')}"
            )


def _open(path: str | Path) -> Any:
    """A local path, or a remote URL (s3://, gs://, ...) through fsspec, opened for reading."""
    if "://" in str(path):
        import fsspec

        return fsspec.open(str(path), "rb").open()
    return open(path, "rb")


def read_checkpoint(
    path: str | Path, *, expect: dict[str, Any] | None = None, map_location: Any = "cpu"
) -> dict[str, Any]:
    """The whole checkpoint dict, read without unpickling code, its metadata checked against `expect`."""
    try:
        f = _open(path)
    except FileNotFoundError:
        raise RecsysError(
            f"checkpoint {path} does not exist; pass a .ckpt file, e.g. <run>/checkpoints/last.ckpt"
        ) from None
    except (IsADirectoryError, NotADirectoryError):
        raise RecsysError(f"checkpoint {path} is not a file; pass a .ckpt file") from None
    except OSError as err:
        raise RecsysError(
            f"checkpoint {path} cannot be read ({err.strerror or err}); check the file's permissions"
        ) from err
    with f:
        try:
            saved = torch.load(f, map_location=map_location, weights_only=True)
        except Exception as err:  # weights_only runs no code: any failure means a damaged or foreign file
            raise _refused(path, err) from err
    _check_metadata(path, saved, expect)
    return saved


def load_checkpoint(
    path: str | Path, *, expect: dict[str, Any] | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state_dict, metadata) of a checkpoint written by train; a RecsysError for anything unsafe or off."""
    saved = read_checkpoint(path, expect=expect)
    return saved["state_dict"], json.loads(saved[METADATA_KEY])


# ---- writing ----------------------------------------------------------------------------------------


def stamp(
    checkpoint: dict[str, Any], metadata: dict[str, Any], vocabulary: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`checkpoint` with `metadata` (and the digest of its weights) embedded as JSON, and the data's
    `Vocabulary.payload()` (with its digest) when given."""
    meta = {**metadata}
    for key in WEIGHT_KEYS:
        if key in checkpoint:
            meta[f"{key}_sha256"] = state_digest(checkpoint[key])
    extra: dict[str, Any] = {}
    if vocabulary is not None:
        meta["vocabulary_sha256"] = payload_digest(vocabulary)
        extra[VOCABULARY_KEY] = vocabulary
    return {**checkpoint, **extra, METADATA_KEY: json.dumps(meta, default=str)}


def save_checkpoint(checkpoint: dict[str, Any], path: Path | str) -> None:
    """Serialised first, so a failing disk surfaces as the OSError of a plain write; then written
    atomically (`files.write_atomic`): a failed or killed save leaves the previous file usable."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    hint = (
        f"the previous checkpoint there is unchanged. Free disk space or make {path.parent} writable "
        "(or set paths.output_dir)"
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RecsysError(f"cannot write checkpoint {path} ({err.strerror or err}); {hint}") from err
    write_bytes_atomic(path, buffer.getbuffer(), hint=hint)


# ---- run configs ------------------------------------------------------------------------------------


def _targets(node: Any, where: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, DictConfig | ListConfig):
        raw = OmegaConf.to_container(node, resolve=False)
        keys = list(node.keys()) if isinstance(node, DictConfig) else range(len(node))
        for key in keys:
            value = _value(node, key, raw[key])  # type: ignore[index]
            at = f"{where}.{key}" if where else str(key)
            if key == "_target_":
                yield at, value
            else:
                yield from _targets(value, at)


def _allowed(name: str) -> bool:
    return name in ALLOWED_TARGETS or name.startswith(ALLOWED_TARGET_PREFIXES)


def _located(target: str) -> str | None:
    """The defining `module.qualname` of what `target` names (None if it is no class or function)."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception:
        return None
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not callable(obj) or not isinstance(module, str) or not isinstance(qualname, str):
        return None
    return f"{module}.{qualname}"


def check_targets(cfg: DictConfig | dict[str, Any], source: str | Path, at: str = "") -> None:
    """Refuse a config (read from `source`; `at`: the key it sits at there) that would instantiate
    anything outside the allowlist."""
    node = cfg if isinstance(cfg, DictConfig | ListConfig) else OmegaConf.create(cfg)
    allowed = ", ".join([*ALLOWED_TARGET_PREFIXES, *ALLOWED_TARGETS])
    for where, target in _targets(node, at):
        # A name inside an allowed package can still reach anything it imports
        # (recsys_mamba.x.os.system), so what it resolves to must be allowed too.
        defined = _located(target) if isinstance(target, str) and _allowed(target) else None
        if defined is None or not _allowed(defined):
            raise RecsysError(
                f"{source}: {where}={target!r} is not allowed; a saved run config may only instantiate "
                f"classes and functions of {allowed}. The file was NOT used: it may have been tampered "
                "with; restore the config.yaml that train wrote, or retrain"
            )
