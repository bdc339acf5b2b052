"""Triton backend: fused forward and backward selective-scan kernels.

One program owns (batch row, BLOCK_D channels) and walks time in chunks of K steps. Inside a
chunk the recurrence h_t = a_t h_{t-1} + b_t is an associative scan over a (BLOCK_D, BLOCK_N, K)
register tile; the state carried between chunks lives in registers and is written to global
memory only at chunk boundaries (the backward's checkpoints). The backward re-runs each chunk's
forward from its checkpoint, then gets dL/dh_t with a reverse scan of
G_t = C_t dy_t + a_{t+1} G_{t+1}, walking chunks from last to first. Loads are cast to fp32, so
fp16/bf16 inputs accumulate in fp32. Set TRITON_INTERPRET=1 before importing triton to run on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

K_CHUNK = 32
BLOCK_D = 16


@triton.jit
def _affine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _channel_params(A_ptr, D_ptr, bias_ptr, offs_d, offs_n, mask_d, mask_dn, N,
                    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        Dv = tl.zeros((BLOCK_D,), tl.float32)
    return A, bias, Dv


@triton.jit
def _load_state(ptr, offs, mask, PRESENT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    if PRESENT:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        return tl.zeros((BLOCK_D, BLOCK_N), tl.float32)


@triton.jit
def _chunk_forward(u_ptr, delta_ptr, B_ptr, C_ptr, A, bias, row, bc_row, offs_d, offs_n, t, mask_dt,
                   mask_nt, h_carry, L, SOFTPLUS: tl.constexpr):
    """Loads one chunk and returns (dt, u, Bt, Ct, a, b, h) with h the states inside the chunk."""
    ptr_dt = row + offs_d[:, None] * L + t[None, :]
    u = tl.load(u_ptr + ptr_dt, mask=mask_dt, other=0.0).to(tl.float32)
    dt = tl.load(delta_ptr + ptr_dt, mask=mask_dt, other=0.0).to(tl.float32) + bias[:, None]
    if SOFTPLUS:
        dt = _softplus(dt)
    ptr_nt = bc_row + offs_n[:, None] * L + t[None, :]
    Bt = tl.load(B_ptr + ptr_nt, mask=mask_nt, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + ptr_nt, mask=mask_nt, other=0.0).to(tl.float32)
    valid = (t < L)[None, None, :]
    a = tl.where(valid, tl.exp(dt[:, None, :] * A[:, :, None]), 1.0)
    b = (dt * u)[:, None, :] * Bt[None, :, :]
    a_cum, b_cum = tl.associative_scan((a, b), axis=2, combine_fn=_affine)
    h = a_cum * h_carry[:, :, None] + b_cum
    return dt, u, Bt, Ct, a, b, h


@triton.jit
def _scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
                     out_ptr, last_ptr, ckpt_ptr, dim, L, N, dpg, groups, n_chunks,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_H0: tl.constexpr, SOFTPLUS: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr):
    pid_b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, K)
    mask_d = offs_d < dim
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]
    A, bias, Dv = _channel_params(A_ptr, D_ptr, bias_ptr, offs_d, offs_n, mask_d, mask_dn, N,
                                  HAS_D, HAS_BIAS, BLOCK_D)
    state_off = (pid_b * dim + offs_d[:, None]) * N + offs_n[None, :]
    h = _load_state(h0_ptr, state_off, mask_dn, HAS_H0, BLOCK_D, BLOCK_N)
    row = pid_b * dim * L
    # A program's channels all use one B/C group (BLOCK_D divides dim // groups or groups == 1).
    g = (tl.program_id(1) * BLOCK_D) // dpg
    bc_row = (pid_b * groups + g) * N * L
    for c in range(n_chunks):
        ckpt_off = ((pid_b * dim + offs_d[:, None]) * n_chunks + c) * N + offs_n[None, :]
        tl.store(ckpt_ptr + ckpt_off, h, mask=mask_dn)
        t = c * K + offs_k
        mask_dt = mask_d[:, None] & (t < L)[None, :]
        mask_nt = (offs_n < N)[:, None] & (t < L)[None, :]
        _, u, _, Ct, _, _, hs = _chunk_forward(u_ptr, delta_ptr, B_ptr, C_ptr, A, bias, row, bc_row,
                                               offs_d, offs_n, t, mask_dt, mask_nt, h, L, SOFTPLUS)
        y = tl.sum(hs * Ct[None, :, :], axis=1) + Dv[:, None] * u
        if HAS_Z:
            z = tl.load(z_ptr + row + offs_d[:, None] * L + t[None, :], mask=mask_dt, other=0.0)
            z = z.to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + row + offs_d[:, None] * L + t[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=mask_dt)
        h = tl.sum(tl.where((offs_k == K - 1)[None, None, :], hs, 0.0), axis=2)
    tl.store(last_ptr + state_off, h, mask=mask_dn)


@triton.jit
def _scan_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr,
                     dout_ptr, dlast_ptr, du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dB_ptr, dC_ptr,
                     dh0_ptr, dim, L, N, dpg, groups, n_chunks, n_dblocks,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_DLAST: tl.constexpr, SOFTPLUS: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, K)
    mask_d = offs_d < dim
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]
    A, bias, Dv = _channel_params(A_ptr, D_ptr, bias_ptr, offs_d, offs_n, mask_d, mask_dn, N,
                                  HAS_D, HAS_BIAS, BLOCK_D)
    state_off = (pid_b * dim + offs_d[:, None]) * N + offs_n[None, :]
    G_carry = _load_state(dlast_ptr, state_off, mask_dn, HAS_DLAST, BLOCK_D, BLOCK_N)
    row = pid_b * dim * L
    g = (pid_d * BLOCK_D) // dpg
    bc_row = (pid_b * groups + g) * N * L
    # dB/dC partial sums per channel block (summed on the host): no atomics, deterministic.
    dbc_row = ((pid_d * tl.num_programs(0) + pid_b) * N) * L
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    a_first = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        t = c * K + offs_k
        mask_dt = mask_d[:, None] & (t < L)[None, :]
        mask_nt = (offs_n < N)[:, None] & (t < L)[None, :]
        ckpt_off = ((pid_b * dim + offs_d[:, None]) * n_chunks + c) * N + offs_n[None, :]
        h0 = tl.load(ckpt_ptr + ckpt_off, mask=mask_dn, other=0.0)
        dt, u, Bt, Ct, a, b, hs = _chunk_forward(u_ptr, delta_ptr, B_ptr, C_ptr, A, bias, row, bc_row,
                                                 offs_d, offs_n, t, mask_dt, mask_nt, h0, L, SOFTPLUS)
        ptr_dt = row + offs_d[:, None] * L + t[None, :]
        dy = tl.load(dout_ptr + ptr_dt, mask=mask_dt, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + ptr_dt, mask=mask_dt, other=0.0).to(tl.float32)
            sz = tl.sigmoid(z)
            y = tl.sum(hs * Ct[None, :, :], axis=1) + Dv[:, None] * u
            tl.store(dz_ptr + ptr_dt, dy * y * sz * (1.0 + z * (1.0 - sz)), mask=mask_dt)
            dy = dy * z * sz
        # a_{t+1}: the next step's decay, which links G_t to G_{t+1}.
        t1 = t + 1
        mask_next = mask_d[:, None] & (t1 < L)[None, :]
        dt_n = tl.load(delta_ptr + row + offs_d[:, None] * L + t1[None, :], mask=mask_next,
                       other=0.0).to(tl.float32) + bias[:, None]
        if SOFTPLUS:
            dt_n = _softplus(dt_n)
        a_next = tl.where((t1 < L)[None, None, :], tl.exp(dt_n[:, None, :] * A[:, :, None]), 1.0)
        t_last = tl.minimum(c * K + K, L) - 1
        is_last = (t == t_last)[None, None, :]
        alpha = tl.where(is_last | (t1 >= L)[None, None, :], 0.0, a_next)
        beta = Ct[None, :, :] * dy[:, None, :] + tl.where(is_last, a_next * G_carry[:, :, None], 0.0)
        beta = tl.where((t < L)[None, None, :], beta, 0.0)
        _, G = tl.associative_scan((alpha, beta), axis=2, combine_fn=_affine, reverse=True)
        ah = hs - b  # a_t * h_{t-1}, without storing h_{t-1}
        gah = G * ah
        ddt = tl.sum(gah * A[:, :, None], axis=1) + u * tl.sum(G * Bt[None, :, :], axis=1)
        if SOFTPLUS:
            raw = tl.load(delta_ptr + ptr_dt, mask=mask_dt, other=0.0).to(tl.float32) + bias[:, None]
            ddt = tl.where(raw <= 20.0, ddt * tl.sigmoid(raw), ddt)
        tl.store(ddelta_ptr + ptr_dt, ddt, mask=mask_dt)
        du = dt * tl.sum(G * Bt[None, :, :], axis=1) + dy * Dv[:, None]
        tl.store(du_ptr + ptr_dt, du, mask=mask_dt)
        dA_acc += tl.sum(gah * dt[:, None, :], axis=2)
        dD_acc += tl.sum(dy * u, axis=1)
        ptr_nt = dbc_row + offs_n[:, None] * L + t[None, :]
        tl.store(dB_ptr + ptr_nt, tl.sum(G * (dt * u)[:, None, :], axis=0), mask=mask_nt)
        tl.store(dC_ptr + ptr_nt, tl.sum(hs * dy[:, None, :], axis=0), mask=mask_nt)
        first = (offs_k == 0)[None, None, :]
        G_carry = tl.sum(tl.where(first, G, 0.0), axis=2)
        a_first = tl.sum(tl.where(first, a, 0.0), axis=2)
    tl.store(dh0_ptr + state_off, a_first * G_carry, mask=mask_dn)
    tl.store(dA_ptr + state_off, dA_acc, mask=mask_dn)
    tl.store(dD_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d)


def _blocks(dim: int, groups: int, N: int) -> tuple[int, int]:
    block_d = BLOCK_D
    while groups > 1 and (dim // groups) % block_d:
        block_d //= 2  # a block must not straddle two B/C groups
    return block_d, max(2, triton.next_power_of_2(N))


class _ScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus):
        nb, dim, L = u.shape
        groups, N = B.shape[1], A.shape[1]
        block_d, block_n = _blocks(dim, groups, N)
        n_chunks = triton.cdiv(L, K_CHUNK)
        out = torch.empty_like(u)
        last = torch.empty(nb, dim, N, device=u.device, dtype=torch.float32)
        ckpt = torch.empty(nb, dim, n_chunks, N, device=u.device, dtype=torch.float32)
        dummy = u.new_empty(1)
        grid = (nb, triton.cdiv(dim, block_d))
        _scan_fwd_kernel[grid](
            u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy,
            initial_state if initial_state is not None else dummy, out, last, ckpt,
            dim, L, N, dim // groups, groups, n_chunks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            HAS_H0=initial_state is not None, SOFTPLUS=softplus,
            BLOCK_D=block_d, BLOCK_N=block_n, K=K_CHUNK,
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        ctx.softplus = softplus
        ctx.has_h0 = initial_state is not None
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        nb, dim, L = u.shape
        groups, N = B.shape[1], A.shape[1]
        block_d, block_n = _blocks(dim, groups, N)
        n_dblocks = triton.cdiv(dim, block_d)
        f32 = dict(device=u.device, dtype=torch.float32)
        dout = torch.zeros_like(u) if dout is None else dout.contiguous()
        du, ddelta = torch.empty(u.shape, **f32), torch.empty(u.shape, **f32)
        dz = torch.empty(u.shape, **f32) if z is not None else None
        dA = torch.empty(nb, dim, N, **f32)
        dD = torch.empty(nb, dim, **f32)
        dB = torch.zeros(n_dblocks, nb, N, L, **f32)
        dC = torch.zeros(n_dblocks, nb, N, L, **f32)
        dh0 = torch.empty(nb, dim, N, **f32)
        dummy = u.new_empty(1)
        _scan_bwd_kernel[(nb, n_dblocks)](
            u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, ckpt, dout,
            dlast.contiguous() if dlast is not None else dummy,
            du, ddelta, dz if dz is not None else dummy, dA, dD, dB, dC, dh0,
            dim, L, N, dim // groups, groups, ckpt.shape[2], n_dblocks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            HAS_DLAST=dlast is not None, SOFTPLUS=ctx.softplus,
            BLOCK_D=block_d, BLOCK_N=block_n, K=K_CHUNK,
        )
        # Channel blocks -> groups: blocks never straddle groups, so sum each group's blocks.
        per_group = n_dblocks // groups if groups > 1 else n_dblocks
        dB = dB.view(groups, per_group, nb, N, L).sum(1).transpose(0, 1)
        dC = dC.view(groups, per_group, nb, N, L).sum(1).transpose(0, 1)
        return (du, ddelta, dA.sum(0), dB, dC, None if D is None else dD.sum(0), dz,
                None if delta_bias is None else ddelta.sum((0, 2)),
                dh0 if ctx.has_h0 else None, None)


def selective_scan_triton(
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
    grouped = B.dim() == 4
    if not grouped:
        B, C = B.unsqueeze(1), C.unsqueeze(1)

    def c(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.contiguous()

    out, last = _ScanFn.apply(c(u), c(delta), c(A), c(B), c(C), c(D), c(z), c(delta_bias),
                              c(initial_state), delta_softplus)
    return (out, last) if return_last_state else out
