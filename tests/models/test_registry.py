"""Encoders by name, and the Hydra configs that build encoders and heads."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from recsys_mamba.errors import RecsysError
from recsys_mamba.models import ENCODERS, CTRHead, NextItemHead, build_encoder
from tests.models.conftest import REPO_ROOT
from tests.models.test_mamba import mamba_param_count
from tests.models.test_sasrec import sasrec_param_count

CONF = REPO_ROOT / "conf"


def test_build_encoder_by_name() -> None:
    for name, cls in ENCODERS.items():
        assert type(build_encoder(name, n_items=10, d_model=16)) is cls


def test_unknown_encoder_lists_the_known_ones() -> None:
    with pytest.raises(RecsysError, match=r"'transformer'.*gru4rec, mamba, sasrec"):
        build_encoder("transformer", n_items=10)


# Default configs on ML-100K's 1,682 items; counts from the architecture formulas in the model tests.
DEFAULT_PARAMS = {
    "mamba": mamba_param_count(1682, d_model=64, n_layers=2, d_state=16, d_conv=4, expand=2),
    "sasrec": sasrec_param_count(1682, d_model=64, n_layers=2, max_len=200),
    "gru4rec": 1683 * 64 + 3 * (2 * 64 * 64 + 2 * 64),
}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_model_config_builds_the_encoder(name: str) -> None:
    cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    model = instantiate(cfg)(n_items=1682, n_categories=0, n_event_types=0)
    assert type(model) is ENCODERS[name]
    assert sum(p.numel() for p in model.parameters()) == DEFAULT_PARAMS[name]


def test_head_configs_build_the_heads() -> None:
    next_item = instantiate(OmegaConf.load(CONF / "head" / "next_item.yaml"))
    assert isinstance(next_item, NextItemHead) and next_item.loss_type == "ce"
    ctr = instantiate(OmegaConf.load(CONF / "head" / "ctr.yaml"))(d_model=64)
    assert isinstance(ctr, CTRHead) and ctr.target_attention
