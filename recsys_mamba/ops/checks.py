"""Input validation shared by every backend: clear errors that name the argument and both shapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from recsys_mamba.errors import RecsysError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ScanArgs(NamedTuple):
    """`selective_scan`'s arguments (mamba-ssm's `selective_scan_fn` names and layouts), as every
    backend receives them."""

    u: torch.Tensor
    delta: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor | None = None
    z: torch.Tensor | None = None
    delta_bias: torch.Tensor | None = None
    delta_softplus: bool = False
    return_last_state: bool = False
    initial_state: torch.Tensor | None = None


@dataclass(frozen=True)
class ScanDims:
    batch: int
    dim: int
    length: int
    d_state: int
    groups: int  # B and C are shared by dim // groups channels each


def _fail(name: str, t: torch.Tensor, expected: str) -> RecsysError:
    return RecsysError(f"{name} has shape {tuple(t.shape)}, expected {expected}")


def _check_tensor(
    name: str, t: object, device: torch.device, dtypes: tuple = FLOAT_DTYPES
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise RecsysError(
            f"{name} has dtype {t.dtype}, expected one of {', '.join(str(d) for d in dtypes)}"
        )
    if t.device != device:
        raise RecsysError(f"{name} is on {t.device} but u is on {device}; move every input to one device")
    return t


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], names: str) -> None:
    if tuple(t.shape) != expected:
        raise _fail(name, t, f"{expected} = {names}")


def _check_bc(
    name: str, t: torch.Tensor, batch: int, dim: int, tail: tuple[int, ...], tail_names: str
) -> int:
    """B or C, plain (batch, *tail) or grouped (batch, groups, *tail); returns groups."""
    if t.dim() == 1 + len(tail):
        _check_shape(name, t, (batch, *tail), f"(batch, {tail_names})")
        return 1
    if t.dim() == 2 + len(tail) and t.shape[0] == batch and tuple(t.shape[2:]) == tail:
        groups = t.shape[1]
        if groups < 1 or dim % groups:
            raise _fail(name, t, f"a number of groups that divides dim={dim}")
        return groups
    raise _fail(name, t, f"({batch}, {', '.join(map(str, tail))}) = (batch, {tail_names}) or "
                f"({batch}, groups, {', '.join(map(str, tail))})")


def check_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
) -> ScanDims:
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"u must be a torch.Tensor, got {type(u).__name__}")
    device = u.device
    _check_tensor("u", u, device)
    if u.dim() != 3:
        raise _fail("u", u, "(batch, dim, length)")
    batch, dim, length = u.shape
    if length < 1:
        raise _fail("u", u, "(batch, dim, length) with length >= 1")
    _check_tensor("delta", delta, device)
    _check_shape("delta", delta, (batch, dim, length), "(batch, dim, length)")
    _check_tensor("A", A, device, (torch.float32, torch.float64))
    if A.dim() != 2 or A.shape[0] != dim:
        raise _fail("A", A, f"({dim}, d_state) = (dim, d_state)")
    d_state = A.shape[1]
    _check_tensor("B", B, device)
    _check_tensor("C", C, device)
    groups = _check_bc("B", B, batch, dim, (d_state, length), "d_state, length")
    if _check_bc("C", C, batch, dim, (d_state, length), "d_state, length") != groups or C.dim() != B.dim():
        raise _fail("C", C, f"the same layout as B {tuple(B.shape)}")
    if D is not None:
        _check_tensor("D", D, device)
        _check_shape("D", D, (dim,), "(dim,)")
    if z is not None:
        _check_tensor("z", z, device)
        _check_shape("z", z, (batch, dim, length), "(batch, dim, length)")
    if delta_bias is not None:
        _check_tensor("delta_bias", delta_bias, device)
        _check_shape("delta_bias", delta_bias, (dim,), "(dim,)")
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, device)
        _check_shape("initial_state", initial_state, (batch, dim, d_state), "(batch, dim, d_state)")
    return ScanDims(batch, dim, length, d_state, groups)


def check_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
) -> int:
    """Validates one streaming step; returns the number of B/C groups."""
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"state must be a torch.Tensor, got {type(state).__name__}")
    device = state.device
    _check_tensor("state", state, device, (torch.float32, torch.float64, torch.float16, torch.bfloat16))
    if state.dim() != 3:
        raise _fail("state", state, "(batch, dim, d_state)")
    batch, dim, d_state = state.shape
    for name, t in (("x", x), ("dt", dt)):
        _check_tensor(name, t, device)
        _check_shape(name, t, (batch, dim), "(batch, dim)")
    _check_tensor("A", A, device, (torch.float32, torch.float64))
    _check_shape("A", A, (dim, d_state), "(dim, d_state)")
    _check_tensor("B", B, device)
    _check_tensor("C", C, device)
    groups = _check_bc("B", B, batch, dim, (d_state,), "d_state")
    if _check_bc("C", C, batch, dim, (d_state,), "d_state") != groups or C.dim() != B.dim():
        raise _fail("C", C, f"the same layout as B {tuple(B.shape)}")
    if z is not None:
        _check_tensor("z", z, device)
        _check_shape("z", z, (batch, dim), "(batch, dim)")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            _check_tensor(name, t, device)
            _check_shape(name, t, (dim,), "(dim,)")
    return groups


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64 (the oracle), else fp32."""
    fp64 = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if fp64 else torch.float32
