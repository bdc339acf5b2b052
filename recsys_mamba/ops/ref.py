"""The oracle: plain sequential PyTorch, autograd for the backward, float64-capable."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recsys_mamba.ops.checks import compute_dtype


def _expand_groups(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, groups, ...) -> (batch, dim, ...) with each group shared by dim // groups channels."""
    return t.repeat_interleave(dim // t.shape[1], dim=1)


def selective_scan_ref(
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
    dtype_in = u.dtype
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, _ = u.shape
    if B.dim() == 3:
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
        C_t = C[:, None].expand(batch, dim, *C.shape[1:])
    else:
        deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, _expand_groups(B, dim), u)
        C_t = _expand_groups(C, dim)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    h = (
        initial_state.to(ct)
        if initial_state is not None
        else u.new_zeros((batch, dim, A.shape[1]))
    )
    ys = []
    # unbind, not indexing: each indexed slice's backward would materialise a full-size gradient.
    for a_t, bu_t, c_t in zip(deltaA.unbind(2), deltaB_u.unbind(2), C_t.unbind(-1), strict=True):
        h = a_t * h + bu_t
        ys.append((h * c_t).sum(-1))
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u * D.to(ct)[:, None]
    if z is not None:
        out = out * F.silu(z.to(ct))
    out = out.to(dtype_in)
    return (out, h) if return_last_state else out


def selective_state_update_ref(
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
    ct = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    dim = state.shape[1]
    x_c, dt, A, B, C = (t.to(ct) for t in (x, dt, A, B, C))
    if dt_bias is not None:
        dt = dt + dt_bias.to(ct)
    if dt_softplus:
        dt = F.softplus(dt)
    if B.dim() == 2:
        B, C = B[:, None], C[:, None]
    else:
        B, C = _expand_groups(B, dim), _expand_groups(C, dim)
    new_state = state.to(ct) * torch.exp(dt[..., None] * A) + (dt * x_c)[..., None] * B
    state.copy_(new_state)
    out = (new_state * C).sum(-1)
    if D is not None:
        out = out + x_c * D.to(ct)
    if z is not None:
        out = out * F.silu(z.to(ct))
    return out.to(x.dtype)
