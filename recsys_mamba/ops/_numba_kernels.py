"""numba kernels for the CPU backend; importing this module needs numba (cpu.py falls back without it).

The loops run over a block of up to W channels innermost, so SIMD lanes hold W independent channels:
no horizontal sums inside the recurrence and W independent dependency chains per instruction.
Layouts (all C-contiguous, one float dtype): u, dt, z, out (batch, L, dim) - channels last, as the
model's projections produce them; the forward takes delta raw and forms the step size
dt = softplus(delta + bias) itself (softplus optional), writing dt out for the backward, which folds the
softplus derivative into ddt; At is A transposed, (N, dim); B, C (batch, groups, L, N);
h0, last (batch, dim, N); ckpt (batch, chunks, N, dim) holds the state entering every chunk of K
steps, which is all the backward keeps: it re-runs one chunk forward into K x N x W buffers and walks
it in reverse.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

# Channels per task. Every inner loop runs over these lanes, and each loop pays a fixed setup (alias
# checks, remainder) that 16 lanes could not amortise on AVX2 (BENCHMARKS.md, "Encoders against
# sequence length", 2026-12-03); 64 still leaves two tasks per row of a dim-128 batch of one.
W = 64

_LOG2E = 1.4426950408889634
# ln 2 = HI + LO with few bits in HI, so k * HI is exact and r = x - k ln 2 keeps its precision.
_LN2_SPLIT = {32: (0.693359375, -2.12194440e-4), 64: (0.693147180369123816490, 1.90821492927058770002e-10)}
_EXP_RANGE = {32: (-87.3, 88.3), 64: (-708.3, 709.0)}  # x where 2^k is a normal, finite number


def fast_exp(x):  # pragma: no cover - numba code gets the overload below
    return math.exp(x)


@overload(fast_exp, inline="always", fastmath=True)
def _fast_exp_impl(x):
    """exp as plain arithmetic, so LLVM vectorises the loops around it (math.exp is a scalar libm
    call: numba's llvmlite wheels have no SVML). exp(x) = 2^k * p(r) with k = round(x / ln 2),
    r = x - k ln 2 in [-ln2/2, ln2/2] and p the Taylor polynomial of exp, degree 7 in float32 and 12
    in float64 (truncation error 5e-9 and 6e-15, below each type's epsilon); 2^k is written straight
    into the exponent bits. x is clamped to where 2^k is a normal number, so a very negative x gives
    the smallest normal (~1e-38 in float32, ~1e-308 in float64), not 0: harmless as a decay factor or
    a sigmoid term."""
    if not isinstance(x, types.Float):
        return None
    bits = x.bitwidth
    f, i = (np.float32, np.int32) if bits == 32 else (np.float64, np.int64)
    # 2^k as the bit pattern (k + bias) << mantissa, built in floats: no integer shifts, which numba
    # would widen to int64
    bias, scale = (f(127), f(2.0**23)) if bits == 32 else (f(1023), f(2.0**52))
    lo, hi = (f(v) for v in _EXP_RANGE[bits])
    log2e, ln2_hi, ln2_lo, half = f(_LOG2E), f(_LN2_SPLIT[bits][0]), f(_LN2_SPLIT[bits][1]), f(0.5)
    # Taylor coefficients 1/n! as separate constants (numba freezes scalars, not lists)
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12 = (f(1.0 / math.factorial(n)) for n in range(13))

    # Horner written out: a loop over a coefficient tuple is not unrolled and stops vectorisation.
    if bits == 32:

        def taylor(r):
            return c0 + r * (c1 + r * (c2 + r * (c3 + r * (c4 + r * (c5 + r * (c6 + r * c7))))))
    else:

        def taylor(r):
            p = c8 + r * (c9 + r * (c10 + r * (c11 + r * c12)))
            return c0 + r * (c1 + r * (c2 + r * (c3 + r * (c4 + r * (c5 + r * (c6 + r * (c7 + r * p)))))))

    taylor = njit(inline="always", fastmath=True)(taylor)

    def impl(x):
        x = min(max(x, lo), hi)
        k = np.floor(x * log2e + half)  # math.floor would return an int64 and turn float32 into float64
        r = (x - k * ln2_hi) - k * ln2_lo
        return taylor(r) * i((k + bias) * scale).view(f)

    return impl


def fast_softplus(x):  # pragma: no cover - numba code gets the overload below
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


@overload(fast_softplus, inline="always", fastmath=True)
def _fast_softplus_impl(x):
    """softplus(x) = max(x, 0) + log1p(e) with e = exp(-|x|) in (0, 1]. In float32, log1p(e) is
    2 atanh(s) with s = e / (2 + e) in (0, 1/3], summed to s^15 (truncation below 2e-8 relative, and no
    1 + e is formed, so a tiny e keeps its precision); plain arithmetic, so the loops around it
    vectorise. Float64 (the reference precision, never the fast path) uses libm's log1p."""
    if not isinstance(x, types.Float):
        return None
    f = np.float32 if x.bitwidth == 32 else np.float64
    zero, two = f(0), f(2)
    if x.bitwidth == 64:

        def impl64(x):
            return max(x, zero) + math.log1p(fast_exp(-abs(x)))

        return impl64
    c1, c3, c5, c7, c9, c11, c13, c15 = (f(2.0 / n) for n in (1, 3, 5, 7, 9, 11, 13, 15))

    def impl(x):
        e = fast_exp(-abs(x))
        s = e / (two + e)
        q = s * s
        p = c1 + q * (c3 + q * (c5 + q * (c7 + q * (c9 + q * (c11 + q * (c13 + q * c15))))))
        return max(x, zero) + s * p

    return impl


@njit(inline="always")
def _block(task, nd, ngroups):
    """Task -> (batch row, group, block index in the group, first channel, channel count)."""
    dpg = nd // ngroups
    bpg = (dpg + W - 1) // W
    b = task // (ngroups * bpg)
    g = task // bpg % ngroups
    j = task % bpg
    d0 = g * dpg + j * W
    return b, g, j, d0, min(W, (g + 1) * dpg - d0)


@njit(inline="always")
def _load_block(At, h0, D, bias, b, d0, nw):
    """A task's channels d0 .. d0 + nw in W lanes: A transposed and the starting state (N, W), D (W,),
    and the step-size bias (nw,). Lanes past nw stay zero (dt = 0: their state stays 0), so every inner
    loop runs exactly W times: a constant trip count LLVM turns into whole vectors."""
    N = At.shape[0]
    An = np.zeros((N, W), dtype=At.dtype)
    h = np.zeros((N, W), dtype=At.dtype)
    for n in range(N):
        for w in range(nw):
            An[n, w] = At[n, d0 + w]
            h[n, w] = h0[b, d0 + w, n]
    Db = np.zeros(W, dtype=At.dtype)
    Db[:nw] = D[d0 : d0 + nw]
    return An, h, Db, bias[d0 : d0 + nw].copy()


@njit(inline="always")
def _step_size(rt, biasb, softplus, dst, nw):
    """dst[:nw] = the step size from raw rt: rt + bias, softplus'd when asked."""
    if softplus:
        for w in range(nw):
            dst[w] = fast_softplus(rt[w] + biasb[w])
    else:
        for w in range(nw):
            dst[w] = rt[w] + biasb[w]


@njit(inline="always")
def _update_and_read(B, C, b, g, t, An, h, dtb, dtu, y):
    """h = exp(dt A) h + dt u B_t in place, and y += <C_t, h> per lane."""
    for n in range(An.shape[0]):
        bn = B[b, g, t, n]
        cn = C[b, g, t, n]
        hn = h[n]
        an = An[n]
        for w in range(W):
            v = fast_exp(dtb[w] * an[w]) * hn[w] + dtu[w] * bn
            hn[w] = v
            y[w] += v * cn


@njit(inline="always")
def _gate(y, zt, nw):
    """y[:nw] *= silu(zt); zt a slice, not z[b, t, d0 + w]: with it the loop vectorises (1.5x)."""
    one = y.dtype.type(1)  # a float literal would promote float32 math
    for w in range(nw):
        zw = zt[w]
        y[w] *= zw / (one + fast_exp(-zw))


@njit(parallel=True, fastmath=True, cache=True)
def scan_fwd(u, delta, bias, softplus, At, B, C, D, z, h0, has_z, K, out, last, ckpt, dt):  # pragma: no cover
    """delta (batch, L, dim) is the raw step input: dt = delta + bias, softplus'd when asked, is what
    the recurrence uses, and it is written to dt (batch, L, dim) for the backward."""
    nb, L, nd = u.shape
    ngroups = B.shape[1]
    bpg = (nd // ngroups + W - 1) // W
    for task in prange(nb * ngroups * bpg):
        b, g, _, d0, nw = _block(task, nd, ngroups)
        An, h, Db, biasb = _load_block(At, h0, D, bias, b, d0, nw)
        dtb = np.zeros(W, dtype=u.dtype)
        ub = np.zeros(W, dtype=u.dtype)
        dtu = np.empty(W, dtype=u.dtype)
        y = np.empty(W, dtype=u.dtype)
        for t in range(L):
            if t % K == 0:
                ckpt[b, t // K, :, d0 : d0 + nw] = h[:, :nw]
            dto = dt[b, t, d0 : d0 + nw]
            _step_size(delta[b, t, d0 : d0 + nw], biasb, softplus, dto, nw)
            dtb[:nw] = dto
            ub[:nw] = u[b, t, d0 : d0 + nw]
            for w in range(W):
                dtu[w] = dtb[w] * ub[w]
                y[w] = Db[w] * ub[w]
            _update_and_read(B, C, b, g, t, An, h, dtb, dtu, y)
            if has_z:
                _gate(y, z[b, t, d0 : d0 + nw], nw)
            out[b, t, d0 : d0 + nw] = y[:nw]
        for n in range(h.shape[0]):
            for w in range(nw):
                last[b, d0 + w, n] = h[n, w]


@njit(parallel=True, fastmath=True, cache=True)
def scan_infer(
    u, delta, bias, softplus, At, B, C, D, z, h0, has_z, lengths, last_only, out, last
):  # pragma: no cover
    """scan_fwd's recurrence for inference: no checkpoints and no dt kept for a backward, and each row
    stops after its `lengths[b]` real steps (right padding is never scanned; `last` is the state after
    them). out is (batch, L, dim) with zeros past each row's length, or with last_only (batch, 1, dim):
    only the output at the row's last real step (zeros for a row without steps), so the steps before
    it update the state and skip C, D and the gate; z is then (batch, 1, dim), that step's gate. Per
    step the arithmetic is scan_fwd's, in its order, so the outputs agree with it to the last bit the
    compiler keeps."""
    nb, L, nd = u.shape
    N = At.shape[0]
    ngroups = B.shape[1]
    bpg = (nd // ngroups + W - 1) // W
    for task in prange(nb * ngroups * bpg):
        b, g, _, d0, nw = _block(task, nd, ngroups)
        An, h, Db, biasb = _load_block(At, h0, D, bias, b, d0, nw)
        dtb = np.zeros(W, dtype=u.dtype)
        ub = np.zeros(W, dtype=u.dtype)
        dtu = np.empty(W, dtype=u.dtype)
        y = np.empty(W, dtype=u.dtype)
        steps = min(L, max(0, lengths[b]))
        for t in range(steps):
            _step_size(delta[b, t, d0 : d0 + nw], biasb, softplus, dtb, nw)
            ub[:nw] = u[b, t, d0 : d0 + nw]
            for w in range(W):
                dtu[w] = dtb[w] * ub[w]
            if last_only and t < steps - 1:  # an output nobody reads: the state update alone
                for n in range(N):
                    bn = B[b, g, t, n]
                    hn = h[n]
                    an = An[n]
                    for w in range(W):
                        hn[w] = fast_exp(dtb[w] * an[w]) * hn[w] + dtu[w] * bn
                continue
            for w in range(W):
                y[w] = Db[w] * ub[w]
            _update_and_read(B, C, b, g, t, An, h, dtb, dtu, y)
            if has_z:
                _gate(y, z[b, 0 if last_only else t, d0 : d0 + nw], nw)
            out[b, 0 if last_only else t, d0 : d0 + nw] = y[:nw]
        if last_only:
            if steps == 0:
                out[b, 0, d0 : d0 + nw] = 0
        else:
            out[b, steps:, d0 : d0 + nw] = 0
        for n in range(h.shape[0]):
            for w in range(nw):
                last[b, d0 + w, n] = h[n, w]


@njit(parallel=True, fastmath=True, cache=True)
def scan_bwd(
    u,
    dt,
    softplus,
    At,
    B,
    C,
    D,
    z,
    has_z,
    K,
    ckpt,
    dout,
    dlast,
    du,
    ddt,
    dz,
    dA_bd,
    dD_bd,
    dB_part,
    dC_part,
    dh0,
):  # pragma: no cover
    """dt is the step size scan_fwd used; ddt receives the gradient of its raw input (times the
    softplus derivative 1 - exp(-dt) when softplus). dB_part, dC_part (blocks per group, batch, groups,
    L, N): each task writes its own slice, the caller sums over the first axis."""
    nb, L, nd = u.shape
    N = At.shape[0]
    ngroups = B.shape[1]
    bpg = (nd // ngroups + W - 1) // W
    nchunks = ckpt.shape[1]
    zero, one = u.dtype.type(0), u.dtype.type(1)
    for task in prange(nb * ngroups * bpg):
        b, g, j, d0, nw = _block(task, nd, ngroups)
        gh = np.empty((N, nw), dtype=u.dtype)  # dLoss/dh_t, carried backwards
        for n in range(N):
            for w in range(nw):
                gh[n, w] = dlast[b, d0 + w, n]
        dA_acc = np.zeros((N, nw), dtype=u.dtype)
        dD_acc = np.zeros(nw, dtype=u.dtype)
        Db = D[d0 : d0 + nw].copy()
        hbuf = np.empty((K + 1, N, nw), dtype=u.dtype)  # [0]: state entering the chunk; [k + 1]: after step k
        abuf = np.empty((K, N, nw), dtype=u.dtype)
        dtu = np.empty(nw, dtype=u.dtype)
        dy = np.empty(nw, dtype=u.dtype)
        y = np.empty(nw, dtype=u.dtype)
        ddt_acc = np.empty(nw, dtype=u.dtype)
        gB = np.empty(nw, dtype=u.dtype)
        gbuf = np.empty((N, nw), dtype=u.dtype)  # g_t = dLoss/dh_t at this step, per state index
        ahbuf = np.empty((N, nw), dtype=u.dtype)  # a_t * h_(t-1) * g_t, shared by the dA and ddt terms
        for c in range(nchunks - 1, -1, -1):
            t0 = c * K
            t1 = min(L, t0 + K)
            hbuf[0] = ckpt[b, c, :, d0 : d0 + nw]
            for t in range(t0, t1):
                k = t - t0
                dtt = dt[b, t, d0 : d0 + nw]
                ut = u[b, t, d0 : d0 + nw]
                for w in range(nw):
                    dtu[w] = dtt[w] * ut[w]
                for n in range(N):
                    bn = B[b, g, t, n]
                    An = At[n, d0 : d0 + nw]
                    hp = hbuf[k, n]
                    hk = hbuf[k + 1, n]
                    ak = abuf[k, n]
                    for w in range(nw):
                        a = fast_exp(dtt[w] * An[w])
                        ak[w] = a
                        hk[w] = a * hp[w] + dtu[w] * bn
            for t in range(t1 - 1, t0 - 1, -1):
                k = t - t0
                dtt = dt[b, t, d0 : d0 + nw]
                ut = u[b, t, d0 : d0 + nw]
                dy[:] = dout[b, t, d0 : d0 + nw]
                if has_z:
                    for w in range(nw):
                        y[w] = Db[w] * ut[w]
                    for n in range(N):
                        cn = C[b, g, t, n]
                        hk = hbuf[k + 1, n]
                        for w in range(nw):
                            y[w] += cn * hk[w]
                    zt = z[b, t, d0 : d0 + nw]
                    dzt = dz[b, t, d0 : d0 + nw]
                    for w in range(nw):
                        zw = zt[w]
                        sz = one / (one + fast_exp(-zw))
                        dzt[w] = dy[w] * y[w] * sz * (one + zw * (one - sz))
                        dy[w] *= zw * sz
                for w in range(nw):
                    dD_acc[w] += dy[w] * ut[w]
                    dtu[w] = dtt[w] * ut[w]
                    ddt_acc[w] = zero
                    gB[w] = zero
                # ddt = sum_n (a h_prev g A + g u B); du = dy D + dt sum_n g B.
                # Four loops over n, not one: a loop body touching this many arrays is not vectorised
                # (LLVM cannot rule out aliasing between them), and split up each one is (1.3x).
                for n in range(N):
                    cn = C[b, g, t, n]
                    hp = hbuf[k, n]
                    hk = hbuf[k + 1, n]
                    ak = abuf[k, n]
                    ghn = gh[n]
                    gn_ = gbuf[n]
                    ahn = ahbuf[n]
                    dCn = zero
                    dBn = zero
                    for w in range(nw):
                        gn = ghn[w] + dy[w] * cn
                        dCn += dy[w] * hk[w]
                        gn_[w] = gn
                        ahn[w] = ak[w] * hp[w] * gn
                        dBn += gn * dtu[w]
                        ghn[w] = gn * ak[w]
                    dC_part[j, b, g, t, n] = dCn
                    dB_part[j, b, g, t, n] = dBn
                for n in range(N):
                    ahn = ahbuf[n]
                    dAn = dA_acc[n]
                    for w in range(nw):
                        dAn[w] += ahn[w] * dtt[w]
                for n in range(N):
                    ahn = ahbuf[n]
                    An = At[n, d0 : d0 + nw]
                    for w in range(nw):
                        ddt_acc[w] += ahn[w] * An[w]
                for n in range(N):
                    bn = B[b, g, t, n]
                    gn_ = gbuf[n]
                    for w in range(nw):
                        gB[w] += gn_[w] * bn
                ddtt = ddt[b, t, d0 : d0 + nw]
                dut = du[b, t, d0 : d0 + nw]
                for w in range(nw):
                    ddtt[w] = ddt_acc[w] + gB[w] * ut[w]
                    dut[w] = dy[w] * Db[w] + gB[w] * dtt[w]
                if softplus:  # d softplus(x) / dx = sigmoid(x) = 1 - exp(-softplus(x))
                    for w in range(nw):
                        ddtt[w] *= one - fast_exp(-dtt[w])
        for n in range(N):
            for w in range(nw):
                dh0[b, d0 + w, n] = gh[n, w]
                dA_bd[b, d0 + w, n] = dA_acc[n, w]
        for w in range(nw):
            dD_bd[b, d0 + w] = dD_acc[w]


CONV_T = 64  # time steps per causal-conv task; tasks are (batch row, block of steps), all channels


@njit(inline="always", fastmath=True)
def _conv_pre(xp, w, bias, b, t, acc):  # pragma: no cover
    """acc = bias + sum_k w[k] * xp[b, t + k]: the pre-activation of output step t, whole rows."""
    acc[:] = bias
    for k in range(w.shape[0]):
        xk = xp[b, t + k]
        wk = w[k]
        for c in range(acc.shape[0]):
            acc[c] += wk[c] * xk[c]


@njit(parallel=True, fastmath=True, cache=True)
def conv_fwd(xp, w, bias, silu, out):  # pragma: no cover
    """Causal depthwise conv, channels last: xp (batch, L + K - 1, C) is the input with its K - 1 steps
    of left context, w (K, C), bias (C,), out (batch, L, C); silu applies SiLU to the result. The inner
    loops run along whole channel rows, so LLVM vectorises them."""
    nb, L, nc = out.shape
    one = out.dtype.type(1)
    nt = (L + CONV_T - 1) // CONV_T
    for task in prange(nb * nt):
        b, t0 = task // nt, task % nt * CONV_T
        acc = np.empty(nc, dtype=out.dtype)
        for t in range(t0, min(L, t0 + CONV_T)):
            _conv_pre(xp, w, bias, b, t, acc)
            ot = out[b, t]
            if silu:
                for c in range(nc):
                    ot[c] = acc[c] / (one + fast_exp(-acc[c]))
            else:
                ot[:] = acc


@njit(parallel=True, fastmath=True, cache=True)
def conv_bwd(xp, w, bias, silu, dout, dxp, dw_part, db_part):  # pragma: no cover
    """Gradients of conv_fwd in one parallel pass. Each task recomputes g = dLoss/d(pre-activation)
    (the pre-activation recomputed, not stored) for its own steps and the K - 1 before them, keeps it
    in a task-local buffer, and from it gathers its own rows of dxp (no two tasks write one row), its
    share of the weight gradient and of the bias gradient. dw_part (tasks, K, C) and db_part (tasks, C)
    are summed over the first axis by the caller, tasks = batch * ceil(L / CONV_T). The halo costs
    (K - 1) / CONV_T more pre-activations and saves writing g out and reading it back."""
    nb, L, nc = dout.shape
    K = w.shape[0]
    zero, one = dout.dtype.type(0), dout.dtype.type(1)
    nt = (L + CONV_T - 1) // CONV_T
    for task in prange(nb * nt):
        b, t0 = task // nt, task % nt * CONV_T
        t1 = min(L, t0 + CONV_T)
        first = max(0, t0 - K + 1)  # the first step whose g some row of this task's dxp needs
        g = np.empty((t1 - first, nc), dtype=dout.dtype)
        acc = np.empty(nc, dtype=dout.dtype)
        db = db_part[task]
        db[:] = zero
        dw = dw_part[task]
        dw[:] = zero
        for t in range(first, t1):
            gt = g[t - first]
            dt_ = dout[b, t]
            if silu:
                _conv_pre(xp, w, bias, b, t, acc)
                for c in range(nc):
                    sg = one / (one + fast_exp(-acc[c]))
                    gt[c] = dt_[c] * sg * (one + acc[c] * (one - sg))
            else:
                gt[:] = dt_
            if t >= t0:
                for c in range(nc):
                    db[c] += gt[c]
                for k in range(K):
                    xk = xp[b, t + k]
                    dwk = dw[k]
                    for c in range(nc):
                        dwk[c] += gt[c] * xk[c]
        # Rows of xp: the task's own steps, and on the last block also the K - 1 rows past L.
        for s in range(t0, t1 + (K - 1 if t1 == L else 0)):
            ds = dxp[b, s]
            ds[:] = zero
            for k in range(K):
                t = s - k
                if first <= t < t1:
                    gt = g[t - first]
                    wk = w[k]
                    for c in range(nc):
                        ds[c] += gt[c] * wk[c]


NORM_ROWS = 64  # rows per RMSNorm task


@njit(parallel=True, fastmath=True, cache=True)
def rms_norm_fwd(x, w, eps, out, rstd):  # pragma: no cover
    """x, out (rows, d); w (d,); rstd (rows,) receives 1 / sqrt(mean(x^2) + eps) for the backward."""
    rows, d = x.shape
    one = x.dtype.type(1)
    for task in prange((rows + NORM_ROWS - 1) // NORM_ROWS):
        for i in range(task * NORM_ROWS, min(rows, (task + 1) * NORM_ROWS)):
            xi = x[i]
            ss = x.dtype.type(0)
            for c in range(d):
                ss += xi[c] * xi[c]
            r = one / np.sqrt(ss / d + eps)
            rstd[i] = r
            oi = out[i]
            for c in range(d):
                oi[c] = xi[c] * r * w[c]


@njit(parallel=True, fastmath=True, cache=True)
def rms_norm_bwd(x, w, rstd, dy, dx, dw_part):  # pragma: no cover
    """dx = r (w dy) - x r^3 mean(w dy x); dw_part (tasks, d) holds each task's sum of dy x r, the
    caller sums over the first axis."""
    rows, d = x.shape
    zero = x.dtype.type(0)
    for task in prange((rows + NORM_ROWS - 1) // NORM_ROWS):
        dw = dw_part[task]
        dw[:] = zero
        for i in range(task * NORM_ROWS, min(rows, (task + 1) * NORM_ROWS)):
            xi, gi, dxi = x[i], dy[i], dx[i]
            r = rstd[i]
            dot = zero
            for c in range(d):
                dot += gi[c] * w[c] * xi[c]
            k = r * r * r * dot / d
            for c in range(d):
                dxi[c] = r * w[c] * gi[c] - k * xi[c]
                dw[c] += gi[c] * xi[c] * r
