"""Selective-scan kernels (Mamba's S6 recurrence): tensors in, tensors out.

`selective_scan` and `selective_state_update` follow mamba-ssm's `selective_scan_fn` and
`selective_state_update` (argument names, layouts, semantics). Backends (`ops.backend`, one resolver
for every op): `ref` (sequential PyTorch, the oracle), `cpu` (compiled numba kernels, pure-torch
fallback), `triton` (fused CUDA kernels; CPU tensors only under TRITON_INTERPRET=1), `auto` (triton
on CUDA, cpu otherwise).

The Mamba block's other kernels sit beside it: `ops.conv.causal_conv1d` (depthwise causal conv) and
`ops.norm.rms_norm` (fused RMSNorm), and `ops.linear_ce` the fused full-softmax loss.
"""

from __future__ import annotations

import torch

from recsys_mamba.ops.backend import BACKENDS
from recsys_mamba.ops.backend import resolve as resolve_backend
from recsys_mamba.ops.checks import ScanArgs, check_scan, check_state_update
from recsys_mamba.ops.chunked import selective_scan_chunked
from recsys_mamba.ops.ref import selective_scan_ref, selective_state_update_ref

__all__ = [
    "BACKENDS",
    "resolve_backend",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
]


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y_t = <C_t, h_t> + D u_t with h_t = exp(delta'_t A) h_{t-1} + delta'_t B_t u_t; times silu(z).

    u, delta, z: (batch, dim, length); A: (dim, d_state); B, C: (batch, d_state, length) or
    (batch, groups, d_state, length); D, delta_bias: (dim,); initial_state: (batch, dim, d_state).
    delta' = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias.
    Returns out (batch, dim, length) in u's dtype, or (out, last_state) with last_state
    (batch, dim, d_state) in fp32 (fp64 for fp64 inputs). Differentiable in every tensor input.
    """
    check_scan(u, delta, A, B, C, D, z, delta_bias, initial_state)
    args = ScanArgs(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)
    name = resolve_backend(backend, u.device)
    if name == "ref":
        return selective_scan_ref(*args)
    if name == "cpu":
        from recsys_mamba.ops.cpu import selective_scan_cpu

        return selective_scan_cpu(args)
    from recsys_mamba.ops.triton_scan import selective_scan_triton

    return selective_scan_triton(args)


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """One streaming step: updates `state` (batch, dim, d_state) in place and returns (batch, dim).

    x, dt, z: (batch, dim); B, C: (batch, d_state) or (batch, groups, d_state); D, dt_bias: (dim,).
    A single step is a few elementwise ops, so every device uses the same PyTorch code.
    """
    check_state_update(state, x, dt, A, B, C, D, z, dt_bias)
    return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
