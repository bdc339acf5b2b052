from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recsys_mamba.errors import RecsysError
from recsys_mamba.ops.conv import causal_conv1d


def _reference(x, weight, bias, initial_states, activation):
    """Plain F.conv1d over the left-padded (batch, dim, L) input, in float64."""
    width = weight.shape[1]
    context = torch.zeros(x.shape[0], x.shape[1], width - 1, dtype=x.dtype) if initial_states is None \
        else initial_states
    out = F.conv1d(torch.cat([context, x], dim=2), weight[:, None, :], bias, groups=x.shape[1])
    return F.silu(out) if activation else out


def _inputs(batch, dim, length, width, dtype, seed=0, with_state=True, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    # channels-last memory, as the mixer hands it over
    x = torch.randn(batch, length, dim, generator=g, dtype=dtype).transpose(1, 2).requires_grad_()
    weight = torch.randn(dim, width, generator=g, dtype=dtype).requires_grad_()
    bias = torch.randn(dim, generator=g, dtype=dtype).requires_grad_() if with_bias else None
    state = torch.randn(batch, dim, width - 1, generator=g, dtype=dtype).requires_grad_() if with_state \
        else None
    return x, weight, bias, state


@pytest.mark.parametrize("backend", ["cpu", "ref"])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize(
    ("batch", "dim", "length", "width", "with_state", "with_bias"),
    # 37 channels and 130 steps: rows and time blocks (64 steps per task) that end short
    [(2, 128, 20, 4, True, True), (3, 37, 130, 4, False, True), (1, 5, 1, 4, True, False),
     (2, 8, 70, 2, True, True), (1, 16, 3, 1, False, True)],
    ids=str,
)
def test_matches_conv1d_in_value_and_every_gradient(backend, activation, batch, dim, length, width,
                                                    with_state, with_bias):
    x, weight, bias, state = _inputs(batch, dim, length, width, torch.float64, with_state=with_state,
                                     with_bias=with_bias)
    leaves = [t for t in (x, weight, bias, state) if t is not None]
    got = causal_conv1d(x, weight, bias, state, activation, backend=backend)
    want = _reference(x, weight, bias, state, activation)
    assert got.shape == (batch, dim, length)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, leaves, upstream)
    want_grads = torch.autograd.grad(want, leaves, upstream)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_float32_is_float32_and_close_to_float64():
    x, weight, bias, state = _inputs(4, 64, 90, 4, torch.float64, seed=1)
    want = causal_conv1d(x, weight, bias, state, "silu", backend="cpu")
    x32, w32, b32, s32 = (t.detach().float() for t in (x, weight, bias, state))
    got = causal_conv1d(x32, w32, b32, s32, "silu", backend="cpu")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)


def test_output_is_channels_last_memory():
    x, weight, bias, _ = _inputs(2, 16, 12, 4, torch.float32)
    out = causal_conv1d(x, weight, bias, activation="silu")
    assert out.transpose(1, 2).is_contiguous()


def test_the_conv_is_causal():
    x, weight, bias, _ = _inputs(1, 8, 30, 4, torch.float64)
    before = causal_conv1d(x, weight, bias, backend="cpu")
    changed = x.detach().clone()
    changed[:, :, 20] += 1.0
    after = causal_conv1d(changed, weight, bias, backend="cpu")
    torch.testing.assert_close(after[:, :, :20], before[:, :, :20], rtol=0, atol=0)
    assert not torch.allclose(after[:, :, 20], before[:, :, 20])


def test_chunks_with_carried_state_equal_one_pass():
    x, weight, bias, _ = _inputs(2, 12, 50, 4, torch.float64)
    whole = causal_conv1d(x, weight, bias, activation="silu", backend="cpu")
    first = causal_conv1d(x[:, :, :29], weight, bias, activation="silu", backend="cpu")
    second = causal_conv1d(x[:, :, 29:], weight, bias, initial_states=x[:, :, 26:29], activation="silu",
                           backend="cpu")
    torch.testing.assert_close(torch.cat([first, second], dim=2), whole)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"weight": torch.zeros(7, 4)}, r"weight has shape \(7, 4\), expected \(8, width\)"),
     ({"bias": torch.zeros(3)}, r"bias has shape \(3,\), expected \(8,\)"),
     ({"initial_states": torch.zeros(2, 8, 4)},
      r"initial_states has shape \(2, 8, 4\), expected \(2, 8, 3\)"),
     ({"activation": "relu"}, "activation must be one of"),
     ({"backend": "cuda"}, "backend='cuda' is not one of")],
)
def test_bad_inputs_name_the_argument_and_the_expected_shape(kwargs, match):
    args = {"x": torch.zeros(2, 8, 5), "weight": torch.zeros(8, 4)} | kwargs
    with pytest.raises(RecsysError, match=match):
        causal_conv1d(**args)
