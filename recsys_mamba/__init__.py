"""recsys-mamba: behaviour logs to event sequences, Mamba and attention encoders for next-click and CTR."""

from recsys_mamba.version import __version__

__all__ = ["__version__"]
