"""Mamba-specific behaviour: initialisation, weight decay groups, long histories, fixed-size state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recsys_mamba.errors import RecsysError
from recsys_mamba.models import MambaEncoder
from tests.models.conftest import make_encoder, random_batch


def mamba_param_count(
    n_items, d_model, n_layers, d_state, d_conv, expand, ffn_mult=4, ffn=True, n_side=0
) -> int:
    """Parameters as the issue describes the architecture (RMSNorm, no in/out projection biases)."""
    d_inner, dt_rank = expand * d_model, math.ceil(d_model / 16)
    mixer = (
        d_model * 2 * d_inner  # in_proj
        + d_inner * d_conv
        + d_inner  # depthwise conv + bias
        + d_inner * (dt_rank + 2 * d_state)  # x_proj
        + dt_rank * d_inner
        + d_inner  # dt_proj + bias
        + d_inner * d_state
        + d_inner  # A_log, D
        + d_inner * d_model  # out_proj
    )
    block = (
        d_model + mixer + (d_model + 2 * ffn_mult * d_model**2 + ffn_mult * d_model + d_model if ffn else 0)
    )
    return (n_items + 1) * d_model + n_side + n_layers * block + d_model


@pytest.mark.parametrize("ffn", [True, False])
def test_parameter_count(ffn: bool) -> None:
    model = MambaEncoder(n_items=1682, d_model=64, n_layers=2, d_state=16, d_conv=4, expand=2, ffn=ffn)
    expected = mamba_param_count(1682, 64, 2, 16, 4, 2, ffn=ffn)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_initialisation_as_mamba() -> None:
    model = MambaEncoder(n_items=5000, d_model=32, n_layers=2, d_state=8, dt_min=0.001, dt_max=0.1)
    for block in model.blocks:
        mixer = block.mixer
        assert torch.equal(mixer.A_log, torch.log(torch.arange(1, 9.0)).repeat(64, 1))
        assert torch.equal(mixer.D, torch.ones(64))
        dt = F.softplus(mixer.dt_proj.bias)
        assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001
    assert torch.equal(model.item_emb.weight[0], torch.zeros(32))
    assert model.item_emb.weight[1:].std().item() == pytest.approx(0.02, rel=0.05)


def test_no_weight_decay_groups() -> None:
    model = MambaEncoder(n_items=10, d_model=16, n_layers=1)
    no_decay = model.no_weight_decay()
    for name in ("mixer.A_log", "mixer.D", "mixer.dt_proj.bias", "mixer.conv1d.bias", "norm.weight"):
        assert f"blocks.0.{name}" in no_decay
    assert "norm.weight" in no_decay
    for name in (
        "mixer.in_proj.weight",
        "mixer.x_proj.weight",
        "mixer.dt_proj.weight",
        "mixer.out_proj.weight",
    ):
        assert f"blocks.0.{name}" not in no_decay


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_norm_option(norm: str) -> None:
    model = make_encoder("mamba", norm=norm)
    expected = torch.nn.RMSNorm if norm == "rmsnorm" else torch.nn.LayerNorm
    assert isinstance(model.norm, expected) and isinstance(model.blocks[0].norm, expected)
    with pytest.raises(RecsysError, match="norm must be"):
        make_encoder("mamba", norm="batchnorm")


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 64])
def test_encode_long_equals_forward(chunk_size: int) -> None:
    model = make_encoder("mamba")
    items, cats, events = random_batch(lengths=(40, 17, 3, 1), width=40)
    full = model(items, cats, events)
    hidden, state = model.encode_long(items, cats, events, chunk_size=chunk_size, return_state=True)
    assert (hidden - full).abs().max() <= 1e-5
    # The carried state is the state after each row's last real event, as stepping gives it.
    stepped = model.init_state(4)
    for t in range(40):
        _, stepped = model.step(items[:, t], stepped, cats[:, t], events[:, t])
    for key in ("conv", "ssm"):
        torch.testing.assert_close(state[key], stepped[key], rtol=0, atol=1e-5)


def test_saved_state_continues_a_history() -> None:
    """Encode the first session, store the state as bytes, later encode the second from it."""
    model = make_encoder("mamba")
    items, cats, events = random_batch(lengths=(30, 30), width=30)
    full = model(items, cats, events)
    _, state = model.encode_long(items[:, :18], cats[:, :18], events[:, :18], chunk_size=7, return_state=True)
    blob = model.save_state(state)
    rest = model.encode_long(items[:, 18:], cats[:, 18:], events[:, 18:], state=model.load_state(blob))
    assert (rest - full[:, 18:]).abs().max() <= 1e-5


def test_state_has_a_fixed_size() -> None:
    model = make_encoder("mamba")
    short = model.encode_long(torch.randint(1, 31, (1, 3)), return_state=True)[1]
    long = model.encode_long(torch.randint(1, 31, (1, 3000)), chunk_size=1000, return_state=True)[1]
    assert len(model.save_state(short)) == len(model.save_state(long))
    assert {k: v.shape for k, v in short.items()} == {
        "conv": (1, 2, 32, 3),
        "ssm": (1, 2, 32, 8),
    }


def test_d_conv_must_allow_a_window() -> None:
    with pytest.raises(RecsysError, match="d_conv"):
        MambaEncoder(n_items=5, d_conv=1)


@pytest.mark.slow
def test_encode_100k_event_history() -> None:
    """A 100,000-event history encodes chunk by chunk; resuming from a mid-history state agrees."""
    model = make_encoder("mamba", n_items=1000, d_model=64, d_state=16)
    items = torch.randint(1, 1001, (1, 100_000), generator=torch.Generator().manual_seed(0))
    hidden, state = model.encode_long(items, chunk_size=8192, return_state=True)
    assert hidden.shape == (1, 100_000, 64) and torch.isfinite(hidden).all()
    _, mid = model.encode_long(items[:, :99_000], chunk_size=8192, return_state=True)
    rest = model.encode_long(items[:, 99_000:], state=mid)
    assert (rest - hidden[:, 99_000:]).abs().max() <= 1e-4
    assert len(model.save_state(state)) == len(model.save_state(model.init_state(1)))


@pytest.mark.parametrize("ffn", [True, False])
def test_inference_paths_equal_the_training_forward(ffn: bool) -> None:
    """Without gradients the scan stops at each row's length and last_hidden runs the last block at
    the last event only; real positions agree with the differentiable forward."""
    model = make_encoder("mamba", ffn=ffn, d_model=40)  # d_inner 80: a full channel block and a short one
    items, cats, events = random_batch(lengths=(40, 17, 0, 1), width=40)
    full = model(items, cats, events)
    assert full.requires_grad
    lengths = (items != 0).sum(1)
    with torch.no_grad():
        hidden = model(items, cats, events)
        last = model.last_hidden(items, cats, events)
    torch.testing.assert_close(hidden, full.detach(), rtol=1e-5, atol=1e-5)
    want = full.detach()[torch.arange(4), (lengths - 1).clamp(min=0)]
    torch.testing.assert_close(last, want, rtol=1e-5, atol=1e-5)
    assert (last[2] == 0).all()


def test_last_hidden_with_gradients_is_differentiable() -> None:
    model = make_encoder("mamba")
    items, cats, events = random_batch()
    model.last_hidden(items, cats, events).sum().backward()
    assert model.blocks[-1].mixer.in_proj.weight.grad is not None
