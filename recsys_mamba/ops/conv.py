"""Causal depthwise conv1d, Mamba's short conv before the scan, with an optional fused SiLU.

`causal_conv1d` follows the causal-conv1d package's `causal_conv1d_fn` (x (batch, dim, L), weight
(dim, width), bias, initial_states (batch, dim, width - 1), activation None | "silu"), so the two can
be swapped. On the `cpu` backend (`ops.backend`) numba kernels run over channels-last memory, the
backward in one parallel pass with the pre-activation recomputed rather than stored, because
oneDNN's weight gradient is slow for this depthwise shape (BENCHMARKS.md); every other backend runs
torch's conv2d (oneDNN/cuDNN), the reference and the CUDA path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recsys_mamba.errors import RecsysError
from recsys_mamba.ops.backend import numba_for, numba_kernels

ACTIVATIONS = (None, "silu", "swish")


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp, weight_kc, bias, silu):
        """xp (batch, L + K - 1, C) channels last with its left context; weight_kc (K, C); bias (C,)."""
        nb, length_padded, nc = xp.shape
        out = xp.new_empty(nb, length_padded - weight_kc.shape[0] + 1, nc)
        numba_kernels().conv_fwd(xp.detach().numpy(), weight_kc.detach().numpy(), bias.detach().numpy(),
                            silu, out.numpy())
        ctx.save_for_backward(xp, weight_kc, bias)
        ctx.silu = silu
        return out

    @staticmethod
    def backward(ctx, dout):
        xp, weight_kc, bias = ctx.saved_tensors
        k = numba_kernels()
        dout = dout.contiguous().to(xp.dtype)
        nb, length, nc = dout.shape
        tasks = nb * -(-length // k.CONV_T)
        dxp = torch.empty_like(xp)
        dw_part = xp.new_empty(tasks, *weight_kc.shape)
        db_part = xp.new_empty(tasks, nc)
        xp_, w_, b_ = (t.detach().numpy() for t in (xp, weight_kc, bias))
        k.conv_bwd(xp_, w_, b_, ctx.silu, dout.numpy(), dxp.numpy(), dw_part.numpy(), db_part.numpy())
        return dxp, dw_part.sum(0), db_part.sum(0), None


def _check(x, weight, bias, initial_states, activation) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise RecsysError(f"x must be a (batch, dim, length) tensor, got {getattr(x, 'shape', type(x))}")
    batch, dim, length = x.shape
    if length < 1:
        raise RecsysError(f"x has shape {tuple(x.shape)}, expected length >= 1")
    if weight.dim() != 2 or weight.shape[0] != dim or weight.shape[1] < 1:
        raise RecsysError(f"weight has shape {tuple(weight.shape)}, expected ({dim}, width) = (dim, width)")
    if bias is not None and tuple(bias.shape) != (dim,):
        raise RecsysError(f"bias has shape {tuple(bias.shape)}, expected ({dim},) = (dim,)")
    width = weight.shape[1]
    if initial_states is not None and tuple(initial_states.shape) != (batch, dim, width - 1):
        raise RecsysError(f"initial_states has shape {tuple(initial_states.shape)}, expected "
                          f"({batch}, {dim}, {width - 1}) = (batch, dim, width - 1)")
    if activation not in ACTIVATIONS:
        raise RecsysError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, t in (("weight", weight), ("bias", bias), ("initial_states", initial_states)):
        if t is not None and t.device != x.device:
            raise RecsysError(f"{name} is on {t.device} but x is on {x.device}; "
                              "move every input to one device")


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """out[:, :, t] = act(bias + sum_k weight[:, k] * x[:, :, t - width + 1 + k]), zeros (or
    initial_states) before the first step. x (batch, dim, L) -> (batch, dim, L) in x's dtype.

    Channels-last memory (x a transposed view of (batch, L, dim)) is read without a copy, and the
    result is a transposed view of a (batch, L, dim) tensor. Differentiable in every tensor input.
    """
    _check(x, weight, bias, initial_states, activation)
    kernels = numba_for(backend, x)
    batch, dim, _ = x.shape
    width = weight.shape[1]
    x_cl = x.transpose(1, 2)  # (batch, L, dim), free for channels-last memory
    if initial_states is None:
        context = x_cl.new_zeros(batch, width - 1, dim)
    else:
        context = initial_states.transpose(1, 2).to(x.dtype)
    xp = torch.cat([context, x_cl], dim=1)
    silu = activation is not None
    if kernels is not None:
        bias_ = bias if bias is not None else x.new_zeros(dim)
        out = _ConvFn.apply(xp, weight.t().to(x.dtype).contiguous(), bias_.to(x.dtype), silu)
    else:
        # conv2d over channels_last memory: oneDNN/cuDNN take the layout without transposing copies
        out = F.conv2d(xp.transpose(1, 2).unsqueeze(2), weight[:, None, None, :].to(x.dtype),
                       None if bias is None else bias.to(x.dtype), groups=dim).squeeze(2).transpose(1, 2)
        if silu:
            out = F.silu(out)
    return out.transpose(1, 2)
