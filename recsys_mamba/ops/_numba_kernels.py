"""numba kernels for the CPU backend; importing this module needs numba (cpu.py falls back without it).

The loops run over a block of up to W channels innermost, so SIMD lanes hold W independent channels:
no horizontal sums inside the recurrence and W independent dependency chains per instruction.
Layouts (all C-contiguous, one float dtype): u, dt, z, out (batch, L, dim) - channels last, as the
model's projections produce them; dt is the step size itself (cpu.py adds the bias and applies
softplus with torch's vectorised ops); At is A transposed, (N, dim); B, C (batch, groups, L, N);
h0, last (batch, dim, N); ckpt (batch, chunks, N, dim) holds the state entering every chunk of K
steps, which is all the backward keeps: it re-runs one chunk forward into K x N x W buffers and walks
it in reverse.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

W = 16  # channels per task: one AVX-512 register of float32

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
            return c0 + r * (c1 + r * (c2 + r * (c3 + r * (c4 + r * (c5 + r * (c6 + r * (
                c7 + r * p)))))))
    taylor = njit(inline="always", fastmath=True)(taylor)

    def impl(x):
        x = min(max(x, lo), hi)
        k = np.floor(x * log2e + half)  # math.floor would return an int64 and turn float32 into float64
        r = (x - k * ln2_hi) - k * ln2_lo
        return taylor(r) * i((k + bias) * scale).view(f)
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


@njit(parallel=True, fastmath=True, cache=True)
def scan_fwd(u, dt, At, B, C, D, z, h0, has_z, K, out, last, ckpt):  # pragma: no cover
    nb, L, nd = u.shape
    N = At.shape[0]
    ngroups = B.shape[1]
    bpg = (nd // ngroups + W - 1) // W
    one = u.dtype.type(1)  # a float literal would promote float32 math
    for task in prange(nb * ngroups * bpg):
        b, g, _, d0, nw = _block(task, nd, ngroups)
        # Lanes past nw stay zero (dt = 0: their state stays 0), so every inner loop runs exactly W
        # times: a constant trip count LLVM turns into whole vectors.
        An = np.zeros((N, W), dtype=u.dtype)
        h = np.zeros((N, W), dtype=u.dtype)
        for n in range(N):
            for w in range(nw):
                An[n, w] = At[n, d0 + w]
                h[n, w] = h0[b, d0 + w, n]
        dtb = np.zeros(W, dtype=u.dtype)
        ub = np.zeros(W, dtype=u.dtype)
        Db = np.zeros(W, dtype=u.dtype)
        Db[:nw] = D[d0:d0 + nw]
        dtu = np.empty(W, dtype=u.dtype)
        y = np.empty(W, dtype=u.dtype)
        for t in range(L):
            if t % K == 0:
                ckpt[b, t // K, :, d0:d0 + nw] = h[:, :nw]
            dtb[:nw] = dt[b, t, d0:d0 + nw]
            ub[:nw] = u[b, t, d0:d0 + nw]
            for w in range(W):
                dtu[w] = dtb[w] * ub[w]
                y[w] = Db[w] * ub[w]
            for n in range(N):
                bn = B[b, g, t, n]
                cn = C[b, g, t, n]
                hn = h[n]
                an = An[n]
                for w in range(W):
                    v = fast_exp(dtb[w] * an[w]) * hn[w] + dtu[w] * bn
                    hn[w] = v
                    y[w] += v * cn
            if has_z:
                for w in range(nw):
                    zt = z[b, t, d0 + w]
                    y[w] *= zt / (one + fast_exp(-zt))
            out[b, t, d0:d0 + nw] = y[:nw]
        for n in range(N):
            for w in range(nw):
                last[b, d0 + w, n] = h[n, w]


@njit(parallel=True, fastmath=True, cache=True)
def scan_bwd(u, dt, At, B, C, D, z, has_z, K, ckpt, dout, dlast,
             du, ddt, dz, dA_bd, dD_bd, dB_part, dC_part, dh0):  # pragma: no cover
    """dB_part, dC_part (blocks per group, batch, groups, L, N): each task writes its own slice, the
    caller sums over the first axis."""
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
        hbuf = np.empty((K + 1, N, nw), dtype=u.dtype)  # [0]: state entering the chunk; [k + 1]: after step k
        abuf = np.empty((K, N, nw), dtype=u.dtype)
        dtu = np.empty(nw, dtype=u.dtype)
        dy = np.empty(nw, dtype=u.dtype)
        y = np.empty(nw, dtype=u.dtype)
        ddt_acc = np.empty(nw, dtype=u.dtype)
        gB = np.empty(nw, dtype=u.dtype)
        for c in range(nchunks - 1, -1, -1):
            t0 = c * K
            t1 = min(L, t0 + K)
            hbuf[0] = ckpt[b, c, :, d0:d0 + nw]
            for t in range(t0, t1):
                k = t - t0
                dtt = dt[b, t, d0:d0 + nw]
                ut = u[b, t, d0:d0 + nw]
                for w in range(nw):
                    dtu[w] = dtt[w] * ut[w]
                for n in range(N):
                    bn = B[b, g, t, n]
                    An = At[n, d0:d0 + nw]
                    hp = hbuf[k, n]
                    hk = hbuf[k + 1, n]
                    ak = abuf[k, n]
                    for w in range(nw):
                        a = fast_exp(dtt[w] * An[w])
                        ak[w] = a
                        hk[w] = a * hp[w] + dtu[w] * bn
            for t in range(t1 - 1, t0 - 1, -1):
                k = t - t0
                dtt = dt[b, t, d0:d0 + nw]
                ut = u[b, t, d0:d0 + nw]
                for w in range(nw):
                    dy[w] = dout[b, t, d0 + w]
                if has_z:
                    for w in range(nw):
                        y[w] = D[d0 + w] * ut[w]
                    for n in range(N):
                        cn = C[b, g, t, n]
                        hk = hbuf[k + 1, n]
                        for w in range(nw):
                            y[w] += cn * hk[w]
                    for w in range(nw):
                        zt = z[b, t, d0 + w]
                        sz = one / (one + fast_exp(-zt))
                        dz[b, t, d0 + w] = dy[w] * y[w] * sz * (one + zt * (one - sz))
                        dy[w] *= zt * sz
                for w in range(nw):
                    dD_acc[w] += dy[w] * ut[w]
                    dtu[w] = dtt[w] * ut[w]
                    ddt_acc[w] = zero
                    gB[w] = zero
                # ddt = sum_n (a h_prev g A + g u B); du = dy D + dt sum_n g B
                for n in range(N):
                    bn = B[b, g, t, n]
                    cn = C[b, g, t, n]
                    An = At[n, d0:d0 + nw]
                    hp = hbuf[k, n]
                    hk = hbuf[k + 1, n]
                    ak = abuf[k, n]
                    ghn = gh[n]
                    dAn = dA_acc[n]
                    dCn = zero
                    dBn = zero
                    for w in range(nw):
                        gn = ghn[w] + dy[w] * cn
                        dCn += dy[w] * hk[w]
                        ah = ak[w] * hp[w] * gn
                        ddt_acc[w] += ah * An[w]
                        dAn[w] += ah * dtt[w]
                        gB[w] += gn * bn
                        dBn += gn * dtu[w]
                        ghn[w] = gn * ak[w]
                    dC_part[j, b, g, t, n] = dCn
                    dB_part[j, b, g, t, n] = dBn
                for w in range(nw):
                    ddt[b, t, d0 + w] = ddt_acc[w] + gB[w] * ut[w]
                    du[b, t, d0 + w] = dy[w] * D[d0 + w] + gB[w] * dtt[w]
        for n in range(N):
            for w in range(nw):
                dh0[b, d0 + w, n] = gh[n, w]
                dA_bd[b, d0 + w, n] = dA_acc[n, w]
        for w in range(nw):
            dD_bd[b, d0 + w] = dD_acc[w]
