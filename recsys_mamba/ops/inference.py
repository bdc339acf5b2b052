"""The selective scan for inference: no autograd, right-padded rows scanned only up to their length, and
optionally only each row's last output (what ranking the next item reads).

`selective_scan_inference` takes `selective_scan`'s arguments plus `lengths` and `last_only`. On the
`cpu` backend it runs the numba kernel `scan_infer`, which keeps nothing for a backward and skips C, D
and the gate at every step but the last one read; every other backend runs its own `selective_scan`
with the step size zeroed past each row's length (so the state passes padding unchanged) and gathers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recsys_mamba.errors import RecsysError
from recsys_mamba.ops.backend import numba_kernels, resolve
from recsys_mamba.ops.checks import ScanArgs, check_scan, compute_dtype


def _check_extras(
    u: torch.Tensor, z: torch.Tensor | None, lengths: torch.Tensor | None, last_only: bool
) -> None:
    batch, dim, _ = u.shape
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (batch,):
            got = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
            raise RecsysError(f"lengths must be a ({batch},) = (batch,) integer tensor, got {got}")
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise RecsysError(f"lengths must hold integer step counts, got dtype {lengths.dtype}")
        if lengths.device != u.device:
            raise RecsysError(f"lengths is on {lengths.device} but u is on {u.device}; move it to u's device")
    if z is not None and z.dim() == 2 and not (last_only and tuple(z.shape) == (batch, dim)):
        raise RecsysError(
            f"z has shape {tuple(z.shape)}: a (batch, dim) = ({batch}, {dim}) gate of the last step only "
            "goes with last_only=True; otherwise pass z as (batch, dim, length)"
        )


@torch.no_grad()
def selective_scan_inference(
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
    lengths: torch.Tensor | None = None,
    last_only: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`selective_scan`'s forward, without gradients, for right-padded rows.

    lengths (batch,): the real steps of each row (None: all `length`); steps past it are not scanned
    (their inputs may hold anything, even NaN), their outputs are 0 and the last state is the one after
    the row's last real step. last_only: out is (batch, dim), each row's output at its last real step
    (0 for a row of length 0); z may then be (batch, dim), the gate of that step alone, so the caller
    need not project z at every step.
    Returns out (in u's dtype), or (out, last_state) as `selective_scan` does.
    """
    z_full = z if z is None or z.dim() == 3 else None
    check_scan(u, delta, A, B, C, D, z_full, delta_bias, initial_state)
    _check_extras(u, z, lengths, last_only)
    args = ScanArgs(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)
    if resolve(backend, u.device) == "cpu" and numba_kernels() is not None:
        from recsys_mamba.ops.cpu import selective_scan_inference_cpu

        return selective_scan_inference_cpu(args, lengths, last_only)
    from recsys_mamba.ops import selective_scan

    return inference_from_scan(args, lengths, last_only, lambda *a: selective_scan(*a, backend=backend))


def inference_from_scan(
    args: ScanArgs, lengths: torch.Tensor | None, last_only: bool, scan
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`selective_scan_inference` through a full scan `scan(*ScanArgs)`: the step size is zeroed past each
    row's length (the state then passes unchanged) and the last outputs are gathered."""
    u, delta, A, B, C, D, z, delta_bias, softplus, return_last_state, initial_state = args
    batch, _, length = u.shape
    gate = z if z is not None and z.dim() == 2 else None
    z_full = None if gate is not None else z
    steps = (
        torch.full((batch,), length, device=u.device) if lengths is None else lengths.long().clamp(0, length)
    )
    valid = torch.arange(length, device=u.device)[None, :] < steps[:, None]

    def real(t: torch.Tensor | None) -> torch.Tensor | None:
        """t with its steps past each row's length, which may hold anything (even NaN), zeroed."""
        return None if t is None else torch.where(valid.view(batch, *[1] * (t.dim() - 2), length), t, 0)

    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    if softplus:
        dt = F.softplus(dt)
    out, state = scan(
        real(u), real(dt), A, real(B), real(C), D, real(z_full), None, False, True, initial_state
    )
    if last_only:
        rows = torch.arange(batch, device=u.device)
        out = out[rows, :, (steps - 1).clamp(min=0)] * (steps > 0)[:, None]
        if gate is not None:
            out = out * F.silu(gate.to(out.dtype))
    else:
        out = out * valid[:, None, :]
    return (out, state) if return_last_state else out
