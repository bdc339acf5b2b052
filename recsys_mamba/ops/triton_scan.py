"""Triton backend: fused forward and backward selective-scan kernels.

One program owns (batch row, BLOCK_D channels of one B/C group) and walks time in chunks of K
steps. Inside a chunk the recurrence h_t = a_t h_{t-1} + b_t is an associative scan over a
(BLOCK_D, BLOCK_N, K) register tile; the state carried between chunks lives in registers and is
written to global memory only at chunk boundaries (the backward's checkpoints). The backward re-runs
each chunk's forward from its checkpoint, then gets dL/dh_t with a reverse scan of
G_t = C_t dy_t + a_{t+1} G_{t+1}, walking chunks from last to first. Loads are cast to fp32, so
fp16/bf16 inputs accumulate in fp32. Set TRITON_INTERPRET=1 before importing triton to run on CPU.

dB and dC sum over the channels of a B/C group, which several programs share. By default the programs
add into one fp32 output with atomics, as mamba-ssm's backward does: the summation order varies from
run to run (fp32 rounding only). Under `torch.use_deterministic_algorithms(True)` each channel block
stores its own partial sums instead and the host adds them up in a fixed order, at the cost of
(channel blocks per group) times the output's bytes written.

The binaries the code can launch are few on purpose: one per kernel, activation dtype (fp32, fp16,
bf16) and BLOCK_N, with BLOCK_D, K and num_warps fixed by `launch_config(d_state)`. The optional
inputs are runtime flags, no scalar is specialised, and the wrapper hands the kernels contiguous,
16-byte aligned tensors in one activation dtype with fp32 parameters. `ops.triton_aot` compiles all of
them for sm_80 and sm_90 without a GPU (tests/ops/test_triton_compile.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from recsys_mamba.errors import RecsysError
from recsys_mamba.ops.checks import ScanArgs, compute_dtype


@triton.jit
def _affine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _channel_params(A_ptr, D_ptr, bias_ptr, offs_d, offs_n, mask_d, mask_dn, N, has_d, has_bias,
                    BLOCK_D: tl.constexpr):
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if has_bias != 0:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    Dv = tl.zeros((BLOCK_D,), tl.float32)
    if has_d != 0:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    return A, bias, Dv


@triton.jit
def _load_state(ptr, offs, mask, present, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    if present != 0:
        h = tl.load(ptr + offs, mask=mask, other=0.0)
    return h


@triton.jit
def _channel_block(pid, dpg, blocks_per_group, BLOCK_D: tl.constexpr):
    """Program pid's group and channels: a block never straddles two B/C groups (masked at the end)."""
    g = pid // blocks_per_group
    local = (pid % blocks_per_group) * BLOCK_D + tl.arange(0, BLOCK_D)
    return g, g * dpg + local, local < dpg


@triton.jit
def _chunk_forward(u_ptr, delta_ptr, B_ptr, C_ptr, A, bias, row, bc_row, offs_d, offs_n, t, mask_dt,
                   mask_nt, h_carry, L, softplus):
    """Loads one chunk and returns (dt, u, Bt, Ct, a, b, h) with h the states inside the chunk."""
    ptr_dt = row + offs_d[:, None] * L + t[None, :]
    u = tl.load(u_ptr + ptr_dt, mask=mask_dt, other=0.0).to(tl.float32)
    dt = tl.load(delta_ptr + ptr_dt, mask=mask_dt, other=0.0).to(tl.float32) + bias[:, None]
    if softplus != 0:
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
def _chunk_tile(c, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The chunk index as a (BLOCK_D, BLOCK_N) tile, to mask a state with (the interpreter takes no
    scalar in a mask)."""
    return tl.full((BLOCK_D, BLOCK_N), c, tl.int32)


@triton.jit
def _put_dbc(ptrs, value, mask, shared_dbc):
    if shared_dbc != 0:
        tl.atomic_add(ptrs, value, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, value, mask=mask)


# Scalars are runtime arguments that Triton must not specialise: by default it compiles a separate
# binary for every int equal to 1 and every multiple of 16, and constexpr presence flags would double
# the binaries each (2^5 forward variants per block size and dtype). The flags become uniform branches
# around loads and a few elementwise ops per (channel, step), small next to a chunk's
# (BLOCK_D, BLOCK_N, K) tile of exponentials and scans (not timed on a GPU yet: `bench gpu` will).
_FWD_SCALARS = ["dim", "L", "N", "dpg", "groups", "n_chunks", "blocks_per_group",
                "has_d", "has_z", "has_bias", "has_h0", "softplus"]
_BWD_SCALARS = ["dim", "L", "N", "dpg", "groups", "n_chunks", "blocks_per_group",
                "has_d", "has_z", "has_bias", "has_h0", "has_dlast", "softplus", "shared_dbc"]


@triton.jit(do_not_specialize=_FWD_SCALARS)
def _scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
                     out_ptr, last_ptr, ckpt_ptr, dim, L, N, dpg, groups, n_chunks, blocks_per_group,
                     has_d, has_z, has_bias, has_h0, softplus,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr):
    pid_b = tl.program_id(0)
    g, offs_d, mask_d = _channel_block(tl.program_id(1), dpg, blocks_per_group, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, K)
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]
    A, bias, Dv = _channel_params(A_ptr, D_ptr, bias_ptr, offs_d, offs_n, mask_d, mask_dn, N, has_d, has_bias,
                                  BLOCK_D)
    state_off = (pid_b * dim + offs_d[:, None]) * N + offs_n[None, :]
    h = _load_state(h0_ptr, state_off, mask_dn, has_h0, BLOCK_D, BLOCK_N)
    row = pid_b * dim * L
    bc_row = (pid_b * groups + g) * N * L
    for c in range(n_chunks):
        # Chunk 0 starts from the initial state (or zeros), which the backward reads itself.
        ckpt_off = ((pid_b * dim + offs_d[:, None]) * n_chunks + c) * N + offs_n[None, :]
        tl.store(ckpt_ptr + ckpt_off, h, mask=mask_dn & (_chunk_tile(c, BLOCK_D, BLOCK_N) > 0))
        t = c * K + offs_k
        mask_dt = mask_d[:, None] & (t < L)[None, :]
        mask_nt = (offs_n < N)[:, None] & (t < L)[None, :]
        _, u, _, Ct, _, _, hs = _chunk_forward(u_ptr, delta_ptr, B_ptr, C_ptr, A, bias, row, bc_row,
                                               offs_d, offs_n, t, mask_dt, mask_nt, h, L, softplus)
        y = tl.sum(hs * Ct[None, :, :], axis=1) + Dv[:, None] * u
        if has_z != 0:
            z = tl.load(z_ptr + row + offs_d[:, None] * L + t[None, :], mask=mask_dt, other=0.0)
            z = z.to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + row + offs_d[:, None] * L + t[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=mask_dt)
        h = tl.sum(tl.where((offs_k == K - 1)[None, None, :], hs, 0.0), axis=2)
    tl.store(last_ptr + state_off, h, mask=mask_dn)


@triton.jit(do_not_specialize=_BWD_SCALARS)
def _scan_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, ckpt_ptr,
                     dout_ptr, dlast_ptr, du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dB_ptr, dC_ptr,
                     dh0_ptr, dim, L, N, dpg, groups, n_chunks, blocks_per_group,
                     has_d, has_z, has_bias, has_h0, has_dlast, softplus, shared_dbc,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    g, offs_d, mask_d = _channel_block(pid_d, dpg, blocks_per_group, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, K)
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]
    A, bias, Dv = _channel_params(A_ptr, D_ptr, bias_ptr, offs_d, offs_n, mask_d, mask_dn, N, has_d, has_bias,
                                  BLOCK_D)
    state_off = (pid_b * dim + offs_d[:, None]) * N + offs_n[None, :]
    G_carry = _load_state(dlast_ptr, state_off, mask_dn, has_dlast, BLOCK_D, BLOCK_N)
    row = pid_b * dim * L
    bc_row = (pid_b * groups + g) * N * L
    # dB/dC: with shared_dbc, every channel block of a group adds into the group's row with fp32 atomics
    # (one output, summation order unspecified); without, each block stores its own row of partial sums
    # for the host to add up (deterministic, but (channel blocks) x B's bytes written).
    dbc_row = ((tl.where(shared_dbc != 0, g, pid_d) * tl.num_programs(0) + pid_b) * N) * L
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    a_first = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        t = c * K + offs_k
        mask_dt = mask_d[:, None] & (t < L)[None, :]
        mask_nt = (offs_n < N)[:, None] & (t < L)[None, :]
        ckpt_off = ((pid_b * dim + offs_d[:, None]) * n_chunks + c) * N + offs_n[None, :]
        c_tile = _chunk_tile(c, BLOCK_D, BLOCK_N)
        h0 = tl.load(ckpt_ptr + ckpt_off, mask=mask_dn & (c_tile > 0), other=0.0)
        if has_h0 != 0:
            h0 += tl.load(h0_ptr + state_off, mask=mask_dn & (c_tile == 0), other=0.0)
        dt, u, Bt, Ct, a, b, hs = _chunk_forward(u_ptr, delta_ptr, B_ptr, C_ptr, A, bias, row, bc_row,
                                                 offs_d, offs_n, t, mask_dt, mask_nt, h0, L, softplus)
        ptr_dt = row + offs_d[:, None] * L + t[None, :]
        dy = tl.load(dout_ptr + ptr_dt, mask=mask_dt, other=0.0).to(tl.float32)
        if has_z != 0:
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
        if softplus != 0:
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
        if softplus != 0:
            raw = tl.load(delta_ptr + ptr_dt, mask=mask_dt, other=0.0).to(tl.float32) + bias[:, None]
            ddt = tl.where(raw <= 20.0, ddt * tl.sigmoid(raw), ddt)
        tl.store(ddelta_ptr + ptr_dt, ddt, mask=mask_dt)
        du = dt * tl.sum(G * Bt[None, :, :], axis=1) + dy * Dv[:, None]
        tl.store(du_ptr + ptr_dt, du, mask=mask_dt)
        dA_acc += tl.sum(gah * dt[:, None, :], axis=2)
        dD_acc += tl.sum(dy * u, axis=1)
        ptr_nt = dbc_row + offs_n[:, None] * L + t[None, :]
        _put_dbc(dB_ptr + ptr_nt, tl.sum(G * (dt * u)[:, None, :], axis=0), mask_nt, shared_dbc)
        _put_dbc(dC_ptr + ptr_nt, tl.sum(hs * dy[:, None, :], axis=0), mask_nt, shared_dbc)
        first = (offs_k == 0)[None, None, :]
        G_carry = tl.sum(tl.where(first, G, 0.0), axis=2)
        a_first = tl.sum(tl.where(first, a, 0.0), axis=2)
    if has_h0 != 0:
        tl.store(dh0_ptr + state_off, a_first * G_carry, mask=mask_dn)
    tl.store(dA_ptr + state_off, dA_acc, mask=mask_dn)
    tl.store(dD_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d)


MAX_D_STATE = 256  # the largest d_state the kernels take (mamba-ssm's selective_scan_fn has the same cap)

# One row per BLOCK_N: chunk length K, then BLOCK_D and num_warps for the forward and the backward
# (checkpoints are laid out per channel, so the two kernels may block channels differently). A program
# holds (BLOCK_D, BLOCK_N, K) fp32 tiles in registers; the backward keeps about twice as many alive, so
# it gets half the channels or twice the warps. Every row compiles without register spills for sm_80
# and sm_90 in fp32, fp16 and bf16: `python -m recsys_mamba.bench triton` prints ptxas's figures, and
# tests/ops/test_triton_compile.py fails on a spill. Checkpoints cost d_state x 4 / K bytes per channel
# and token each way, the kernels' largest excess over their bandwidth bound once dB/dC are atomics:
# BLOCK_N 64 takes chunks of 64 for half the channels per block (same tile, half the checkpoints).
_CONFIGS: dict[int, tuple[int, int, int, int, int]] = {
    #     K  fwd: D, warps  bwd: D, warps
    2: (32, 16, 4, 16, 4),
    4: (32, 16, 8, 16, 8),
    8: (32, 16, 4, 16, 8),
    16: (32, 16, 8, 8, 8),
    32: (32, 8, 8, 4, 8),
    64: (64, 2, 8, 1, 8),
    128: (32, 2, 8, 1, 8),
    256: (16, 2, 8, 1, 8),
}


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int
    chunk: int  # K: time steps per chunk; the forward checkpoints the state at each chunk start
    fwd_block_d: int
    fwd_warps: int
    bwd_block_d: int
    bwd_warps: int


def launch_config(d_state: int) -> LaunchConfig:
    """Block sizes and warps for a d_state: the only source of the kernels' constexprs and num_warps."""
    if not 1 <= d_state <= MAX_D_STATE:
        raise RecsysError(f"backend='triton' takes d_state in 1..{MAX_D_STATE}, got {d_state}")
    block_n = max(2, triton.next_power_of_2(d_state))
    return LaunchConfig(block_n, *_CONFIGS[block_n])


def _aligned(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Contiguous, in dtype, 16-byte aligned: the one pointer specialisation the kernels are built for."""
    t = t.to(dtype).contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _dbc_buffers(rows: int, nb: int, N: int, L: int, shared: bool,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """dB and dC as the backward writes them: rows of (batch, N, L), zeroed where atomics add into them."""
    new = torch.zeros if shared else torch.empty  # partial-sum rows are stored whole, every element
    return (new(rows, nb, N, L, device=device, dtype=torch.float32),
            new(rows, nb, N, L, device=device, dtype=torch.float32))


def _per_group(rows: torch.Tensor, groups: int) -> torch.Tensor:
    """(rows, batch, N, L) -> (batch, groups, N, L): a group's partial-sum rows added up (blocks never
    straddle groups), or the rows themselves when the blocks shared them."""
    per = rows.shape[0] // groups
    rows = rows.view(groups, per, *rows.shape[1:])
    return (rows[:, 0] if per == 1 else rows.sum(1)).transpose(0, 1)


class _ScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus):
        nb, dim, L = u.shape
        groups, N = B.shape[1], A.shape[1]
        cfg = launch_config(N)
        dpg = dim // groups
        bpg = triton.cdiv(dpg, cfg.fwd_block_d)
        n_chunks = triton.cdiv(L, cfg.chunk)
        f32 = dict(device=u.device, dtype=torch.float32)
        out = torch.empty_like(u)
        last = torch.empty(nb, dim, N, **f32)
        ckpt = torch.empty(nb, dim, n_chunks, N, **f32)
        act_dummy, f32_dummy = u.new_empty(1), torch.empty(1, **f32)
        _scan_fwd_kernel[(nb, groups * bpg)](
            u, delta, A, B, C, f32_dummy if D is None else D, act_dummy if z is None else z,
            f32_dummy if delta_bias is None else delta_bias,
            f32_dummy if initial_state is None else initial_state, out, last, ckpt,
            dim, L, N, dpg, groups, n_chunks, bpg,
            int(D is not None), int(z is not None), int(delta_bias is not None),
            int(initial_state is not None), int(softplus),
            BLOCK_D=cfg.fwd_block_d, BLOCK_N=cfg.block_n, K=cfg.chunk, num_warps=cfg.fwd_warps,
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt)
        ctx.softplus = softplus
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, h0, ckpt = ctx.saved_tensors
        nb, dim, L = u.shape
        groups, N = B.shape[1], A.shape[1]
        cfg = launch_config(N)
        dpg = dim // groups
        bpg = triton.cdiv(dpg, cfg.bwd_block_d)
        n_dblocks = groups * bpg
        f32 = dict(device=u.device, dtype=torch.float32)
        dout = torch.zeros_like(u) if dout is None else _aligned(dout, u.dtype)
        dlast = None if dlast is None else _aligned(dlast, torch.float32)
        du, ddelta = torch.empty(u.shape, **f32), torch.empty(u.shape, **f32)
        dz = torch.empty(u.shape, **f32) if z is not None else None
        dA = torch.empty(nb, dim, N, **f32)
        dD = torch.empty(nb, dim, **f32)
        shared_dbc = not torch.are_deterministic_algorithms_enabled()
        dB, dC = _dbc_buffers(groups if shared_dbc else n_dblocks, nb, N, L, shared_dbc, u.device)
        dh0 = None if h0 is None else torch.empty(nb, dim, N, **f32)
        act_dummy, f32_dummy = u.new_empty(1), torch.empty(1, **f32)
        _scan_bwd_kernel[(nb, n_dblocks)](
            u, delta, A, B, C, f32_dummy if D is None else D, act_dummy if z is None else z,
            f32_dummy if delta_bias is None else delta_bias, f32_dummy if h0 is None else h0, ckpt, dout,
            f32_dummy if dlast is None else dlast,
            du, ddelta, f32_dummy if dz is None else dz, dA, dD, dB, dC, f32_dummy if dh0 is None else dh0,
            dim, L, N, dpg, groups, ckpt.shape[2], bpg,
            int(D is not None), int(z is not None), int(delta_bias is not None), int(h0 is not None),
            int(dlast is not None), int(ctx.softplus), int(shared_dbc),
            BLOCK_D=cfg.bwd_block_d, BLOCK_N=cfg.block_n, K=cfg.chunk, num_warps=cfg.bwd_warps,
        )
        dB, dC = _per_group(dB, groups), _per_group(dC, groups)
        return (du, ddelta, dA.sum(0), dB, dC, None if D is None else dD.sum(0), dz,
                None if delta_bias is None else ddelta.sum((0, 2)),
                dh0, None)


def selective_scan_triton(args: ScanArgs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state = args
    grouped = B.dim() == 4
    if not grouped:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    # The kernels see one activation dtype (fp32, fp16 or bf16) for u, delta, z, B, C and fp32 for
    # A, D, delta_bias and the initial state, as mamba-ssm's kernels require. Loads are cast to fp32
    # anyway, so fp64 inputs cast on the host give the same result.
    act = activation_dtype(u, delta, z, B, C)

    def c(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        return None if t is None else _aligned(t, dtype)

    f32 = torch.float32
    out, last = _ScanFn.apply(c(u, act), c(delta, act), c(A, f32), c(B, act), c(C, act), c(D, f32),
                              c(z, act), c(delta_bias, f32), c(initial_state, f32), delta_softplus)
    out = out.to(u.dtype)
    if return_last_state:
        return out, last.to(compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state))
    return out


def activation_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype the kernels read u, delta, z, B, C in: their common type, fp64 read as fp32."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors if t is not None))
    return torch.float32 if dtype == torch.float64 else dtype
