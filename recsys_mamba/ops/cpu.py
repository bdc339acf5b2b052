"""CPU backend: compiled numba kernels (parallel over batch x dim, state in registers, chunked
recompute in the backward). Without numba it warns once and falls back to the `ref` loop."""

from __future__ import annotations

import importlib
import warnings

import torch

from recsys_mamba.ops.checks import compute_dtype
from recsys_mamba.ops.ref import selective_scan_ref

CHUNK = 64  # steps re-run per backward chunk: K x d_state buffer stays in L1

_kernels = None
_warned = False


def _load_kernels():
    global _kernels, _warned
    if _kernels is None:
        try:
            _kernels = importlib.import_module("recsys_mamba.ops._numba_kernels")
        except Exception as err:  # ImportError, or numba unable to build for this platform
            _kernels = False
            if not _warned:
                _warned = True
                warnings.warn(
                    f"numba unavailable ({err}); selective_scan backend='cpu' falls back to the slow "
                    "PyTorch reference loop. `pip install numba` for the fast kernels.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _kernels or None


def _np(t: torch.Tensor):
    return t.detach().numpy()


class _ScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus):
        k = _kernels
        ct = u.dtype
        nb, nd, L = u.shape
        N = A.shape[1]
        has_z = z is not None
        z_ = z if has_z else u.new_zeros(1, 1, 1)
        out = torch.empty_like(u)
        last = torch.empty(nb, nd, N, dtype=ct)
        ckpt = torch.empty(nb, nd, (L + CHUNK - 1) // CHUNK, N, dtype=ct)
        k.scan_fwd(*map(_np, (u, delta, A, B, C, D, z_, delta_bias, initial_state)),
                   softplus, has_z, CHUNK, _np(out), _np(last), _np(ckpt))
        ctx.save_for_backward(u, delta, A, B, C, D, z_, delta_bias, ckpt)
        ctx.flags = (softplus, has_z)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        k = _kernels
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        softplus, has_z = ctx.flags
        nb, nd, _ = u.shape
        N = A.shape[1]
        dout = torch.zeros_like(u) if dout is None else dout.contiguous().to(u.dtype)
        dlast = u.new_zeros(nb, nd, N) if dlast is None else dlast.contiguous().to(u.dtype)
        # Enough channel slices that every thread has a task even at batch 1.
        splits = max(1, min(nd, -(-2 * torch.get_num_threads() // nb)))
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dz = torch.empty_like(z)
        dA_bd = u.new_empty(nb, nd, N)
        dD_bd = u.new_empty(nb, nd)
        dB_part = u.new_zeros(splits, *B.shape)
        dC_part = u.new_zeros(splits, *C.shape)
        dh0 = u.new_empty(nb, nd, N)
        k.scan_bwd(*map(_np, (u, delta, A, B, C, D, z, delta_bias)), softplus, has_z, CHUNK,
                   *map(_np, (ckpt, dout, dlast, du, ddelta, dz, dA_bd, dD_bd, dB_part, dC_part, dh0)))
        return (du, ddelta, dA_bd.sum(0), dB_part.sum(0), dC_part.sum(0), dD_bd.sum(0), dz if has_z else None,
                ddelta.sum((0, 2)), dh0, None)


def selective_scan_cpu(
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)
    if _load_kernels() is None:
        return selective_scan_ref(*args)
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    nb, nd, _ = u.shape
    N = A.shape[1]
    grouped = B.dim() == 4

    def prep(t: torch.Tensor | None, default_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if t is None:
            return u.new_zeros(default_shape, dtype=ct)
        return t.to(ct).contiguous()

    def prep_bc(t: torch.Tensor) -> torch.Tensor:
        t = t if grouped else t.unsqueeze(1)
        return t.to(ct).transpose(-1, -2).contiguous()

    out, last = _ScanFn.apply(
        prep(u), prep(delta), prep(A), prep_bc(B), prep_bc(C), prep(D, (nd,)),
        None if z is None else prep(z), prep(delta_bias, (nd,)), prep(initial_state, (nb, nd, N)),
        delta_softplus,
    )
    out = out.to(u.dtype)
    return (out, last) if return_last_state else out
