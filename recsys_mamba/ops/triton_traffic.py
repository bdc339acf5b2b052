"""Bytes the Triton scan kernels move, and a memory-roofline estimate of their time on an H100.

`kernel_traffic` counts, per kernel argument, the bytes the kernel's loads and stores touch (masked-off
lanes excluded), worked out from the code of `_scan_fwd_kernel` and `_scan_bwd_kernel` for one launch.
tests/ops/test_triton_interpret.py checks every count against a tally of the interpreter's actual loads
and stores, so the model follows the kernels.

Three totals come out of it:
- issued: every byte the loads and stores ask for;
- DRAM (estimate): issued, less reads that repeat an address the same launch has already read and that
  a 50 MB L2 keeps for typical shapes: B and C rows read by each channel block of a batch row, the
  backward's second and third reads of delta (its t + 1 shift and the raw value for the softplus
  derivative), and A / D / delta_bias read by every batch row; and less the backward's dB/dC atomics,
  which L2 performs: the (batch, groups, N, L) outputs they add into (1.6 MB at MambaMixer's launch)
  reach DRAM as one write each;
- compulsory: each input read once and each output written once, at the sizes of the op's result
  (dB and dC once per group, dA once): the traffic of an ideal kernel, the bandwidth bound.
The backward's atomics need zeroed outputs: that fill (torch.zeros, its own launch, one write of
dB and dC) is counted in issued and DRAM too. Under torch.use_deterministic_algorithms the backward
stores per-channel-block partial sums instead (`Flags.deterministic`), all counted as DRAM writes.
Times are these bytes over H100 SXM's HBM3 bandwidth: estimates from a model, not measurements, and
memory only (the exponentials and the scans' shuffles are not modelled, so a kernel can be slower).
"""

from __future__ import annotations

from dataclasses import dataclass

import triton

from recsys_mamba.ops.triton_scan import launch_config

# NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100), "GPU memory bandwidth":
# 3.35 TB/s for H100 SXM (HBM3), 2 TB/s for H100 PCIe / 3.9 TB/s for H100 NVL.
H100_SXM_BANDWIDTH = 3.35e12  # bytes per second
FP32 = 4  # the state, checkpoints and every gradient the kernels write are fp32


@dataclass(frozen=True)
class ScanShape:
    batch: int
    dim: int
    length: int
    d_state: int
    groups: int = 1


@dataclass(frozen=True)
class Flags:
    """Which optional inputs a launch has (the kernels' runtime flags)."""

    D: bool = True
    z: bool = True
    delta_bias: bool = True
    initial_state: bool = False
    dlast: bool = True  # the backward always gets one: autograd materialises an unused last_state's grad
    softplus: bool = True
    deterministic: bool = False  # dB/dC as stored partial sums, not atomics (torch's deterministic mode)


@dataclass(frozen=True)
class Access:
    read: int = 0  # bytes
    written: int = 0


def kernel_traffic(kernel: str, shape: ScanShape, act_bytes: int, flags: Flags) -> dict[str, Access]:
    """Bytes per pointer argument of one launch of `kernel` ("fwd" or "bwd"); absent tensors omitted."""
    b, d, L, N, G = shape.batch, shape.dim, shape.length, shape.d_state, shape.groups
    cfg = launch_config(N)
    ckpts = triton.cdiv(L, cfg.chunk) - 1  # every chunk start but the first (the initial state or zeros)
    block_d = cfg.fwd_block_d if kernel == "fwd" else cfg.bwd_block_d
    programs = b * G * triton.cdiv(d // G, block_d)
    e = act_bytes
    per_channel = b * d  # each (batch row, channel) pair is owned by exactly one program
    t: dict[str, Access] = {
        "A_ptr": Access(read=per_channel * N * FP32),
        "u_ptr": Access(read=per_channel * L * e),
        "B_ptr": Access(read=programs * N * L * e),
        "C_ptr": Access(read=programs * N * L * e),
    }
    if flags.D:
        t["D_ptr"] = Access(read=per_channel * FP32)
    if flags.delta_bias:
        t["bias_ptr"] = Access(read=per_channel * FP32)
    if kernel == "fwd":
        t["delta_ptr"] = Access(read=per_channel * L * e)
        if flags.initial_state:
            t["h0_ptr"] = Access(read=per_channel * N * FP32)
        if flags.z:
            t["z_ptr"] = Access(read=per_channel * L * e)
        t["out_ptr"] = Access(written=per_channel * L * e)
        t["last_ptr"] = Access(written=per_channel * N * FP32)
        t["ckpt_ptr"] = Access(written=per_channel * ckpts * N * FP32)
        return _touched(t)
    if kernel != "bwd":
        raise ValueError(f"kernel must be 'fwd' or 'bwd', got {kernel!r}")
    # delta: the chunk, its t + 1 shift (t + 1 < L), and the raw value again for softplus'(x)
    t["delta_ptr"] = Access(read=per_channel * (L + (L - 1) + (L if flags.softplus else 0)) * e)
    t["ckpt_ptr"] = Access(read=per_channel * ckpts * N * FP32)
    if flags.initial_state:
        t["h0_ptr"] = Access(read=per_channel * N * FP32)
        t["dh0_ptr"] = Access(written=per_channel * N * FP32)
    t["dout_ptr"] = Access(read=per_channel * L * e)
    if flags.dlast:
        t["dlast_ptr"] = Access(read=per_channel * N * FP32)
    if flags.z:
        t["z_ptr"] = Access(read=per_channel * L * e)
        t["dz_ptr"] = Access(written=per_channel * L * FP32)
    t["du_ptr"] = Access(written=per_channel * L * FP32)
    t["ddelta_ptr"] = Access(written=per_channel * L * FP32)
    t["dA_ptr"] = Access(written=per_channel * N * FP32)
    t["dD_ptr"] = Access(written=per_channel * FP32)
    rows = programs * N * L * FP32  # each program's (N, L) slice of dB or dC
    dbc = Access(written=rows) if flags.deterministic else Access(read=rows, written=rows)  # RMW
    t["dB_ptr"] = t["dC_ptr"] = dbc
    return _touched(t)


def _touched(t: dict[str, Access]) -> dict[str, Access]:
    """Without the arguments the launch never reads or writes (no checkpoints when L <= K)."""
    return {k: a for k, a in t.items() if a.read or a.written}


def _total(t: dict[str, Access]) -> int:
    return sum(a.read + a.written for a in t.values())


def _dbc_bytes(shape: ScanShape) -> int:
    """One of dB, dC at the op's result size, (batch, groups, N, L) fp32."""
    return shape.batch * shape.groups * shape.d_state * shape.length * FP32


def fill_bytes(kernel: str, shape: ScanShape, flags: Flags) -> int:
    """Bytes the launch's zero fills write beforehand: dB and dC for the backward's atomics."""
    return 2 * _dbc_bytes(shape) if kernel == "bwd" and not flags.deterministic else 0


def dram_estimate(kernel: str, shape: ScanShape, act_bytes: int, flags: Flags) -> int:
    """Issued bytes less what a large L2 serves, plus the zero fills (see the module docstring)."""
    t = kernel_traffic(kernel, shape, act_bytes, flags)
    b, d, L, N, G = shape.batch, shape.dim, shape.length, shape.d_state, shape.groups
    once = {
        "A_ptr": d * N * FP32, "D_ptr": d * FP32, "bias_ptr": d * FP32,
        "B_ptr": b * G * N * L * act_bytes, "C_ptr": b * G * N * L * act_bytes,
        "delta_ptr": b * d * L * act_bytes,
    }
    rereads = sum(t[k].read - v for k, v in once.items() if k in t)
    in_l2 = 0
    if kernel == "bwd" and not flags.deterministic:
        in_l2 = sum(t[k].read + t[k].written - _dbc_bytes(shape) for k in ("dB_ptr", "dC_ptr"))
    return _total(t) - rereads - in_l2 + fill_bytes(kernel, shape, flags)


def compulsory_bytes(kernel: str, shape: ScanShape, act_bytes: int, flags: Flags) -> int:
    """Inputs read once, outputs written once at the op's result sizes: the ideal kernel's traffic."""
    b, d, L, N, G = shape.batch, shape.dim, shape.length, shape.d_state, shape.groups
    e = act_bytes
    act = b * d * L * e  # one (batch, dim, length) activation
    bc = 2 * b * G * N * L * e  # B and C
    params = d * N * FP32 + (d * FP32 if flags.D else 0) + (d * FP32 if flags.delta_bias else 0)
    state = b * d * N * FP32
    if kernel == "fwd":
        reads = 2 * act + (act if flags.z else 0) + bc + params + (state if flags.initial_state else 0)
        return reads + act + state  # out, last_state
    grad = b * d * L * FP32
    reads = 3 * act + (act if flags.z else 0) + bc + params + (state if flags.dlast else 0)
    writes = (2 + flags.z) * grad + 2 * b * G * N * L * FP32 + d * N * FP32 + (d * FP32 if flags.D else 0)
    return reads + writes + (state if flags.initial_state else 0)


@dataclass(frozen=True)
class Roofline:
    issued_per_token: float  # bytes
    dram_per_token: float
    compulsory_per_token: float
    estimate_us: float  # DRAM estimate / bandwidth, for the whole launch
    bound_us: float  # compulsory / bandwidth
    ratio: float  # estimate / bound


def roofline(kernel: str, shape: ScanShape, act_bytes: int, flags: Flags,
             bandwidth: float = H100_SXM_BANDWIDTH) -> Roofline:
    tokens = shape.batch * shape.length
    issued = _total(kernel_traffic(kernel, shape, act_bytes, flags)) + fill_bytes(kernel, shape, flags)
    dram = dram_estimate(kernel, shape, act_bytes, flags)
    need = compulsory_bytes(kernel, shape, act_bytes, flags)
    return Roofline(issued / tokens, dram / tokens, need / tokens, dram / bandwidth * 1e6,
                    need / bandwidth * 1e6, dram / need)
