"""CPU backend: compiled numba kernels (parallel over batch x blocks of `_numba_kernels.W` channels,
the channels in SIMD lanes, chunked recompute in the backward). Without numba it warns once and falls
back to the `ref` loop."""

from __future__ import annotations

import torch

from recsys_mamba.ops.backend import numba_kernels
from recsys_mamba.ops.checks import ScanArgs, compute_dtype
from recsys_mamba.ops.ref import selective_scan_ref

CHUNK = 64  # steps re-run per backward chunk: its K x d_state x W buffers stay in L2


def _np(t: torch.Tensor):
    return t.detach().numpy()


class _ScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, delta_bias, softplus, A, B, C, D, z, initial_state):
        """u, delta, z (batch, L, dim): channels last; B, C (batch, groups, L, N); delta raw: the
        kernel adds delta_bias and applies softplus when asked."""
        k = numba_kernels()
        ct = u.dtype
        nb, L, nd = u.shape
        N = A.shape[1]
        At = A.t().contiguous()
        has_z = z is not None
        z_ = z if has_z else u.new_zeros(1, 1, 1)
        out = torch.empty_like(u)
        dt = torch.empty_like(u)  # the step size the recurrence used, for the backward
        last = torch.empty(nb, nd, N, dtype=ct)
        ckpt = torch.empty(nb, (L + CHUNK - 1) // CHUNK, N, nd, dtype=ct)
        k.scan_fwd(
            _np(u),
            _np(delta),
            _np(delta_bias),
            softplus,
            *map(_np, (At, B, C, D, z_, initial_state)),
            has_z,
            CHUNK,
            _np(out),
            _np(last),
            _np(ckpt),
            _np(dt),
        )
        ctx.save_for_backward(u, dt, At, B, C, D, z_, ckpt)
        ctx.has_z, ctx.softplus = has_z, softplus
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        k = numba_kernels()
        u, dt, At, B, C, D, z, ckpt = ctx.saved_tensors
        has_z = ctx.has_z
        nb, _, nd = u.shape
        N = At.shape[0]
        dout = torch.zeros_like(u) if dout is None else dout.contiguous().to(u.dtype)
        dlast = u.new_zeros(nb, nd, N) if dlast is None else dlast.contiguous().to(u.dtype)
        blocks_per_group = -(-nd // B.shape[1] // k.W)
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dz = torch.empty_like(z)
        dA_bd = u.new_empty(nb, nd, N)
        dD_bd = u.new_empty(nb, nd)
        dB_part = u.new_empty(blocks_per_group, *B.shape)
        dC_part = u.new_empty(blocks_per_group, *C.shape)
        dh0 = u.new_empty(nb, nd, N)
        k.scan_bwd(
            _np(u),
            _np(dt),
            ctx.softplus,
            *map(_np, (At, B, C, D, z)),
            has_z,
            CHUNK,
            *map(_np, (ckpt, dout, dlast, du, ddelta, dz, dA_bd, dD_bd, dB_part, dC_part, dh0)),
        )
        dz = dz if has_z else None
        dbias = ddelta.sum((0, 1)) if ctx.needs_input_grad[2] else None
        return (du, ddelta, dbias, None, dA_bd.sum(0), dB_part.sum(0), dC_part.sum(0), dD_bd.sum(0), dz, dh0)


def _kernel_inputs(args: ScanArgs, ct: torch.dtype) -> dict[str, torch.Tensor | None]:
    """The kernels' layouts in `ct`: u, delta (and z, None when absent) channels last (batch, L, dim),
    B and C (batch, groups, L, N), and zeros for an absent delta_bias, D or initial_state."""
    u, delta, A, B, C, D, z, delta_bias, _, _, initial_state = args
    nb, nd, _ = u.shape

    def prep(t: torch.Tensor | None, default_shape: tuple[int, ...]) -> torch.Tensor:
        return u.new_zeros(default_shape, dtype=ct) if t is None else t.to(ct).contiguous()

    def channels_last(t: torch.Tensor) -> torch.Tensor:
        # (batch, dim, L) -> (batch, L, dim); free when t is a transposed view of a projection's output
        return t.to(ct).transpose(1, 2).contiguous()

    def prep_bc(t: torch.Tensor) -> torch.Tensor:
        t = t if B.dim() == 4 else t.unsqueeze(1)
        return t.to(ct).transpose(-1, -2).contiguous()

    return {
        "u": channels_last(u),
        "delta": channels_last(delta),
        "bias": prep(delta_bias, (nd,)),
        "A": A.to(ct).contiguous(),
        "B": prep_bc(B),
        "C": prep_bc(C),
        "D": prep(D, (nd,)),
        "z": None if z is None or z.dim() == 2 else channels_last(z),
        "h0": prep(initial_state, (nb, nd, A.shape[1])),
    }


def _needs_grad(args: ScanArgs) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args)


def selective_scan_cpu(args: ScanArgs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if numba_kernels() is None:
        return selective_scan_ref(*args)
    if not _needs_grad(args):  # nothing to differentiate: the kernel that keeps nothing for a backward
        return selective_scan_inference_cpu(args, None, last_only=False)
    u = args.u
    x = _kernel_inputs(args, compute_dtype(*args[:8], args.initial_state))
    # Bias and softplus are fused into the kernels (one pass over the step sizes instead of torch's
    # add, softplus and their backward ops, each a pass over (batch, L, dim)).
    out, last = _ScanFn.apply(
        x["u"],
        x["delta"],
        x["bias"],
        bool(args.delta_softplus),
        x["A"],
        x["B"],
        x["C"],
        x["D"],
        x["z"],
        x["h0"],
    )
    out = out.transpose(1, 2).to(u.dtype)
    return (out, last) if args.return_last_state else out


def selective_scan_inference_cpu(
    args: ScanArgs, lengths: torch.Tensor | None, last_only: bool
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`ops.inference.selective_scan_inference` on the numba kernel `scan_infer` (checked arguments,
    numba installed)."""
    u, z = args.u, args.z
    ct = compute_dtype(*args[:8], args.initial_state)
    x = _kernel_inputs(args._replace(z=None) if last_only else args, ct)  # last_only: one gate step
    nb, nd, L = u.shape
    steps = (
        torch.full((nb,), L, dtype=torch.int64)
        if lengths is None
        else lengths.to(torch.int64).clamp(0, L).contiguous()
    )
    if z is None:
        z_ = u.new_zeros(1, 1, 1, dtype=ct)
    elif not last_only:
        z_ = x["z"]
    elif z.dim() == 2:  # the gate of the last step only: (batch, dim)
        z_ = z.to(ct)[:, None].contiguous()
    else:
        z_ = z.to(ct)[torch.arange(nb), :, (steps - 1).clamp(min=0)][:, None].contiguous()
    out = torch.empty(nb, 1 if last_only else L, nd, dtype=ct)
    last = torch.empty(nb, nd, args.A.shape[1], dtype=ct)
    numba_kernels().scan_infer(
        _np(x["u"]),
        _np(x["delta"]),
        _np(x["bias"]),
        bool(args.delta_softplus),
        _np(x["A"].t().contiguous()),
        _np(x["B"]),
        _np(x["C"]),
        _np(x["D"]),
        _np(z_),
        _np(x["h0"]),
        z is not None,
        _np(steps),
        bool(last_only),
        _np(out),
        _np(last),
    )
    out = (out[:, 0] if last_only else out.transpose(1, 2)).to(u.dtype)
    return (out, last) if args.return_last_state else out
