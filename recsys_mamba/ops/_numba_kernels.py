"""numba kernels for the CPU backend; importing this module needs numba (cpu.py falls back without it).

Layouts (all C-contiguous, one float dtype): u, delta, z, out (batch, dim, L); A (dim, N);
B, C transposed to (batch, groups, L, N) so each time step's N values are adjacent; ckpt
(batch, dim, chunks, N) holds the state entering every chunk of K steps, which is all the backward
keeps: it re-runs one chunk forward into a K x N buffer and walks it in reverse.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(inline="always", fastmath=True)
def _dt(delta_raw, softplus):
    if softplus and delta_raw <= 20.0:
        return math.log1p(math.exp(delta_raw))
    return delta_raw


@njit(parallel=True, fastmath=True, cache=True)
def scan_fwd(u, delta, A, B, C, D, z, bias, h0, softplus, has_z, K, out, last, ckpt):  # pragma: no cover
    nb, nd, L = u.shape
    N = A.shape[1]
    dpg = nd // B.shape[1]
    for i in prange(nb * nd):
        b = i // nd
        d = i % nd
        g = d // dpg
        h = h0[b, d].copy()
        Ad = A[d]
        for t in range(L):
            if t % K == 0:
                ckpt[b, d, t // K, :] = h
            dt = _dt(delta[b, d, t] + bias[d], softplus)
            ut = u[b, d, t]
            dtu = dt * ut
            Bt = B[b, g, t]
            Ct = C[b, g, t]
            y = 0.0
            for n in range(N):
                hn = math.exp(dt * Ad[n]) * h[n] + dtu * Bt[n]
                h[n] = hn
                y += hn * Ct[n]
            y += D[d] * ut
            if has_z:
                zt = z[b, d, t]
                y *= zt / (1.0 + math.exp(-zt))
            out[b, d, t] = y
        last[b, d, :] = h


@njit(parallel=True, fastmath=True, cache=True)
def scan_bwd(u, delta, A, B, C, D, z, bias, softplus, has_z, K, ckpt, dout, dlast,
             du, ddelta, dz, dA_bd, dD_bd, dB_part, dC_part, dh0):  # pragma: no cover
    nb, nd, L = u.shape
    N = A.shape[1]
    dpg = nd // B.shape[1]
    splits = dB_part.shape[0]
    per_split = (nd + splits - 1) // splits
    nchunks = ckpt.shape[2]
    # Each task owns one batch row and a slice of channels, so its dB/dC partial sums need no locks.
    for task in prange(nb * splits):
        b = task // splits
        s = task % splits
        hbuf = np.empty((K, N), dtype=u.dtype)
        abuf = np.empty((K, N), dtype=u.dtype)
        for d in range(s * per_split, min(nd, (s + 1) * per_split)):
            g = d // dpg
            Ad = A[d]
            gh = dlast[b, d].copy()  # dLoss/dh_t, carried backwards
            dA_acc = np.zeros(N, dtype=u.dtype)
            dD_acc = 0.0
            for c in range(nchunks - 1, -1, -1):
                t0 = c * K
                t1 = min(L, t0 + K)
                h = ckpt[b, d, c].copy()
                for t in range(t0, t1):
                    dt = _dt(delta[b, d, t] + bias[d], softplus)
                    dtu = dt * u[b, d, t]
                    Bt = B[b, g, t]
                    for n in range(N):
                        a = math.exp(dt * Ad[n])
                        h[n] = a * h[n] + dtu * Bt[n]
                        abuf[t - t0, n] = a
                        hbuf[t - t0, n] = h[n]
                for t in range(t1 - 1, t0 - 1, -1):
                    k = t - t0
                    raw = delta[b, d, t] + bias[d]
                    dt = _dt(raw, softplus)
                    ut = u[b, d, t]
                    Bt = B[b, g, t]
                    Ct = C[b, g, t]
                    dy = dout[b, d, t]
                    if has_z:
                        y = D[d] * ut
                        for n in range(N):
                            y += Ct[n] * hbuf[k, n]
                        zt = z[b, d, t]
                        sz = 1.0 / (1.0 + math.exp(-zt))
                        dz[b, d, t] = dy * y * sz * (1.0 + zt * (1.0 - sz))
                        dy = dy * zt * sz
                    dD_acc += dy * ut
                    du_acc = dy * D[d]
                    ddt = 0.0
                    dCt = dC_part[s, b, g, t]
                    dBt = dB_part[s, b, g, t]
                    for n in range(N):
                        gn = gh[n] + dy * Ct[n]
                        dCt[n] += dy * hbuf[k, n]
                        hprev = hbuf[k - 1, n] if k > 0 else ckpt[b, d, c, n]
                        ah = abuf[k, n] * hprev * gn
                        ddt += ah * Ad[n] + gn * ut * Bt[n]
                        dA_acc[n] += ah * dt
                        dBt[n] += gn * dt * ut
                        du_acc += gn * dt * Bt[n]
                        gh[n] = gn * abuf[k, n]
                    if softplus and raw <= 20.0:
                        ddt *= 1.0 / (1.0 + math.exp(-raw))
                    ddelta[b, d, t] = ddt
                    du[b, d, t] = du_acc
            dh0[b, d, :] = gh
            dA_bd[b, d, :] = dA_acc
            dD_bd[b, d] = dD_acc
