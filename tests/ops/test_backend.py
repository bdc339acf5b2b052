"""One backend choice for the whole Mamba block: the scan, the conv and the norm follow it together."""

from __future__ import annotations

import pytest
import torch

import recsys_mamba.ops.backend as backend
from recsys_mamba.errors import RecsysError
from recsys_mamba.models.mamba import MambaEncoder
from recsys_mamba.ops.conv import causal_conv1d
from recsys_mamba.ops.norm import FUSED_MIN_NUMEL, rms_norm


def no_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> None:
        raise AssertionError("a numba kernel ran under backend='ref'")

    monkeypatch.setattr(backend, "numba_kernels", refuse)


def test_resolve_names_what_cannot_run_here() -> None:
    assert backend.resolve("auto", torch.device("cpu")) == "cpu"
    assert backend.resolve("ref", torch.device("cpu")) == "ref"
    with pytest.raises(RecsysError, match="backend='gpu' is not one of"):
        backend.resolve("gpu", torch.device("cpu"))
    with pytest.raises(RecsysError, match="needs CUDA tensors"):
        backend.resolve("triton", torch.device("cpu"))


def test_ref_runs_conv_and_norm_in_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 8, 30, dtype=torch.float64)
    weight, bias = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    fast = causal_conv1d(x, weight, bias, activation="silu", backend="cpu")
    rows = torch.randn(FUSED_MIN_NUMEL // 16 + 1, 16, dtype=torch.float64)
    w = torch.randn(16, dtype=torch.float64)
    fused = rms_norm(rows, w, 1e-5, backend="cpu")
    no_numba(monkeypatch)
    torch.testing.assert_close(causal_conv1d(x, weight, bias, activation="silu", backend="ref"), fast)
    torch.testing.assert_close(rms_norm(rows, w, 1e-5, backend="ref"), fused)


def test_a_mamba_encoder_on_ref_uses_no_numba_kernel_and_agrees_with_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    cpu = MambaEncoder(n_items=30, d_model=64, n_layers=2, dropout=0.0, scan_backend="cpu").double().eval()
    ref = MambaEncoder(n_items=30, d_model=64, n_layers=2, dropout=0.0, scan_backend="ref").double().eval()
    ref.load_state_dict(cpu.state_dict())
    items = torch.randint(1, 31, (8, 140))  # 8 x 140 x 64 rows: the norm takes its fused path on cpu
    want = cpu(items)
    no_numba(monkeypatch)
    torch.testing.assert_close(ref(items), want)
