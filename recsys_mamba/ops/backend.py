"""Which implementation runs an op: one resolver for the scan, the conv and the norm, so a backend
chosen for a Mamba block applies to the whole block.

- `ref`: plain PyTorch everywhere (the scan's sequential loop, torch's conv and RMSNorm): the oracle.
- `cpu`: the compiled numba kernels (CPU tensors only). Without numba it warns once and runs `ref`.
- `triton`: the fused Triton scan (CUDA tensors; CPU ones only under TRITON_INTERPRET=1), with
  torch's conv and RMSNorm, which cuDNN and the CUDA kernels already fuse.
- `auto`: `triton` on CUDA tensors, `cpu` otherwise.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

from recsys_mamba.errors import RecsysError

BACKENDS = ("auto", "ref", "cpu", "triton")
NUMBA_DTYPES = (torch.float32, torch.float64)

_kernels: ModuleType | bool | None = None


def resolve(backend: str, device: torch.device) -> str:
    """`backend` for tensors on `device`: "ref", "cpu" or "triton"; a clear error where it cannot run."""
    if backend not in BACKENDS:
        raise RecsysError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RecsysError(
            f"backend='triton' needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 before "
            "importing triton to run the kernels on CPU, or use backend='cpu'"
        )
    if backend == "cpu" and device.type != "cpu":
        raise RecsysError(f"backend='cpu' needs CPU tensors, got {device}")
    return backend


def numba_kernels() -> ModuleType | None:
    """The compiled CPU kernels (`ops._numba_kernels`), or None (with one warning) without numba."""
    global _kernels
    if _kernels is None:
        try:
            _kernels = importlib.import_module("recsys_mamba.ops._numba_kernels")
        except Exception as err:  # ImportError, or numba unable to build for this platform
            _kernels = False
            warnings.warn(
                f"numba unavailable ({err}); backend='cpu' falls back to the slow PyTorch reference "
                "ops. `pip install numba` for the fast kernels.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _kernels or None


def numba_for(backend: str, x: torch.Tensor) -> ModuleType | None:
    """The numba kernels when `backend` runs `x` on them (the cpu backend, a dtype they compile for),
    else None: the caller then runs its PyTorch path."""
    if resolve(backend, x.device) != "cpu" or x.dtype not in NUMBA_DTYPES:
        return None
    return numba_kernels()
