"""RMSNorm, y = x / sqrt(mean(x^2) + eps) * weight over the last axis, fused on CPU.

torch's CPU RMSNorm is a chain of elementwise ops in forward and in backward, several times the time of
its fused LayerNorm; on the `cpu` backend (`ops.backend`) the numba pair is one pass over the rows each
way. Every other backend, device and dtype: F.rms_norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recsys_mamba.errors import RecsysError
from recsys_mamba.ops.backend import numba_for, numba_kernels


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, eps):
        out = torch.empty_like(x2d)
        rstd = x2d.new_empty(x2d.shape[0])
        numba_kernels().rms_norm_fwd(
            x2d.detach().numpy(), weight.detach().numpy(), eps, out.numpy(), rstd.numpy()
        )
        ctx.save_for_backward(x2d, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        k = numba_kernels()
        dy = dy.contiguous().to(x2d.dtype)
        dx = torch.empty_like(x2d)
        dw_part = x2d.new_empty(-(-x2d.shape[0] // k.NORM_ROWS), x2d.shape[1])
        k.rms_norm_bwd(x2d.detach().numpy(), weight.detach().numpy(), rstd.numpy(), dy.numpy(),
                       dx.numpy(), dw_part.numpy())
        return dx, dw_part.sum(0), None


FUSED_MIN_NUMEL = 65536  # below it (a streaming step's few rows) torch's ops cost less than a kernel call


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """RMSNorm over x's last axis (size d) with a (d,) weight; x's shape and dtype out."""
    if x.dim() < 1 or tuple(weight.shape) != (x.shape[-1],):
        raise RecsysError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected (d,) with d the size "
                          f"of x's last axis; x has shape {tuple(x.shape)}")
    # numel first: the streaming step's tiny inputs leave after one check
    fused = x.numel() >= FUSED_MIN_NUMEL and weight.dtype == x.dtype and numba_for(backend, x) is not None
    if not fused:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return _RMSNormFn.apply(x.reshape(-1, x.shape[-1]).contiguous(), weight, float(eps)).view(x.shape)
