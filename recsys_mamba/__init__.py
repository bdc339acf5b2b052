"""recsys-mamba: behaviour logs to event sequences, Mamba and attention encoders for next-click and CTR."""

__version__ = "0.1.0"
