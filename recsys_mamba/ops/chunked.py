"""Inference over very long sequences: chunk by chunk, carrying the state; memory bounded by the chunk."""

from __future__ import annotations

import torch


@torch.no_grad()
def selective_scan_chunked(
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
    backend: str = "auto",
    chunk_size: int = 4096,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`selective_scan` without gradients, `chunk_size` steps at a time.

    Working memory is O(batch * dim * d_state + chunk_size * batch * dim) beyond the inputs and the
    output; pass `out` (batch, dim, length) to write into a preallocated (e.g. memory-mapped) tensor.
    """
    from recsys_mamba.ops import selective_scan

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    length = u.shape[-1]
    if out is None:
        out = torch.empty_like(u)
    elif out.shape != u.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected u's shape {tuple(u.shape)}")
    state = initial_state
    for start in range(0, length, chunk_size):
        sl = slice(start, min(start + chunk_size, length))
        y, state = selective_scan(
            u[..., sl], delta[..., sl], A, B[..., sl], C[..., sl], D,
            None if z is None else z[..., sl], delta_bias, delta_softplus,
            return_last_state=True, initial_state=state, backend=backend,
        )
        out[..., sl] = y
    return (out, state) if return_last_state else out
