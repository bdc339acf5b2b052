"""Thread settings shared by the benchmarks (not a subcommand: the leading underscore hides it)."""

from __future__ import annotations

import torch


def set_threads(n: int) -> None:
    """Use `n` threads in numba's scan (when installed) and in torch."""
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    torch.set_num_threads(n)  # after numba's, which can reset torch's thread count
