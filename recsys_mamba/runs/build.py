"""The one place a model is assembled from a config: encoder sized by the data, head sized by the
encoder, and the head's data inputs (a training click rate, transition counts) where it asks."""

from __future__ import annotations

import functools
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from recsys_mamba.errors import RecsysError
from recsys_mamba.models.base import SequenceEncoder
from recsys_mamba.models.heads import Head
from recsys_mamba.models.model import RecModel
from recsys_mamba.tasks.base import HeadInputs


def build_encoder(model_cfg: DictConfig | dict[str, Any], **inputs: Any) -> SequenceEncoder:
    """The encoder `model_cfg` describes (a `_partial_` config), given the data's sizes and item
    attributes (`PreparedData.encoder_inputs`) and any overrides."""
    encoder = instantiate(model_cfg, _partial_=True)
    return encoder(**inputs) if not isinstance(encoder, nn.Module) else encoder


def build_head(head_cfg: DictConfig, encoder: SequenceEncoder, inputs: HeadInputs) -> Head:
    """The head `head_cfg` describes; a `_partial_` one gets the encoder's width and, for the keys
    the config leaves null, what the training data says (e.g. base_rate: the training click rate)."""
    head = instantiate(head_cfg)
    if isinstance(head, functools.partial):
        kwargs: dict[str, Any] = {} if "d_model" in head.keywords else {"d_model": encoder.d_model}
        if head.keywords.get("base_rate", 0.0) is None and inputs.base_rate is not None:
            kwargs["base_rate"] = inputs.base_rate()
        if "n_users" in head.keywords and head.keywords["n_users"] is None:
            if inputs.n_users is None:
                raise RecsysError("head.n_users=null (user embeddings) needs a task that knows its users")
            kwargs["n_users"] = inputs.n_users()
        head = head(**kwargs)
    if head.needs_transitions:
        head.attach_transitions(inputs.transitions())
    if head.needs_attributes:
        head.attach_attributes(getattr(encoder, "item_attributes", None))
    return head


def build_model(cfg: DictConfig, encoder_inputs: dict[str, Any], head_inputs: HeadInputs) -> RecModel:
    """`cfg.model` and `cfg.head` assembled: the same for training, evaluation, scoring and benches."""
    encoder = build_encoder(cfg.model, **encoder_inputs)
    return RecModel(encoder, build_head(cfg.head, encoder, head_inputs))
