"""SASRec-specific behaviour: parameter count, positional limit, KV-cache streaming."""

from __future__ import annotations

import pytest
import torch

from recsys_mamba.errors import RecsysError
from recsys_mamba.models import SASRecEncoder
from recsys_mamba.models.sasrec import CausalSelfAttention
from tests.models.conftest import make_encoder, random_batch


def sasrec_param_count(
    n_items: int, d_model: int, n_layers: int, max_len: int, ffn_mult: int = 4, ffn: bool = True
) -> int:
    d = d_model
    feed_forward = 2 * d + (2 * ffn_mult * d * d + ffn_mult * d + d) if ffn else 0  # its norm, two layers
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + feed_forward
    return (n_items + 1) * d + max_len * d + n_layers * block + 2 * d


@pytest.mark.parametrize("ffn", [True, False])
def test_parameter_count(ffn: bool) -> None:
    model = SASRecEncoder(n_items=1682, d_model=64, n_layers=2, max_len=200, ffn=ffn)
    assert sum(p.numel() for p in model.parameters()) == sasrec_param_count(1682, 64, 2, 200, ffn=ffn)


def test_longer_than_max_len_is_a_clear_error() -> None:
    model = make_encoder("sasrec", max_len=8)
    with pytest.raises(RecsysError, match="max_len 8"):
        model(torch.ones(1, 9, dtype=torch.long))
    state = model.init_state(1)
    for _ in range(8):
        _, state = model.step(torch.tensor([1]), state)
    with pytest.raises(RecsysError, match="max_len 8"):
        model.step(torch.tensor([1]), state)


def test_kv_cache_grows_by_one_per_step() -> None:
    model = make_encoder("sasrec")
    state = model.init_state(3)
    for t in range(4):
        _, state = model.step(torch.tensor([1, 2, 0]), state)
        assert state["k"].shape == (3, 2, 2, t + 1, 8)
    assert state["pos"].tolist() == [4, 4, 0]


@pytest.mark.parametrize("options", [{"scale_embeddings": True}, {"ffn": False}])
def test_variants_keep_the_streaming_contract(options: dict) -> None:
    model = make_encoder("sasrec", **options)
    items, cats, events = random_batch()
    full = model(items, cats, events)
    state = model.init_state(4)
    for t in range(items.shape[1]):
        hidden, state = model.step(items[:, t], state, cats[:, t], events[:, t])
        assert (hidden - full[:, t]).abs().max() <= 1e-5


def test_heads_must_divide_d_model() -> None:
    with pytest.raises(RecsysError, match="divisible"):
        SASRecEncoder(n_items=5, d_model=30, n_heads=4)


def test_cpu_training_attention_spelled_out_equals_sdpa(monkeypatch) -> None:
    # Train mode on CPU with dropout takes the explicit path (cheap dropout mask); with the mask's p
    # at 0 it must equal SDPA's causal attention exactly, and SDPA must not be called.
    torch.manual_seed(0)
    attn = CausalSelfAttention(d_model=16, n_heads=2, dropout=0.3).double()
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    attn.eval()
    want, _ = attn(x)
    attn.train()
    attn.attn_dropout.p = 0.0

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA called in CPU training with dropout")

    monkeypatch.setattr("recsys_mamba.models.sasrec.F.scaled_dot_product_attention", no_sdpa)
    got, _ = attn(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_cpu_training_attention_dropout_drops_and_rescales() -> None:
    torch.manual_seed(0)
    attn = CausalSelfAttention(d_model=16, n_heads=2, dropout=0.5).train()
    x = torch.randn(2, 9, 16)
    a, _ = attn(x)
    b, _ = attn(x)
    assert not torch.allclose(a, b)  # a fresh mask per call
    # Each query's kept weights are rescaled by 1 / P(keep): averaged over many masks, the output is
    # the dropout-free attention.
    with torch.no_grad():
        mean = torch.stack([attn(x)[0] for _ in range(2000)]).mean(0)
        attn.eval()
        want, _ = attn(x)
    torch.testing.assert_close(mean, want, rtol=0, atol=0.05)
