"""Figures as base64 PNG strings, so an HTML report needs no other files (matplotlib, headless)."""

from __future__ import annotations

import base64
import io
from typing import Any


def new_figure(width: float = 4.5, height: float = 4.0) -> tuple[Any, Any]:
    """(figure, axes) of a headless matplotlib figure (reports are written on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def png(fig: Any) -> str:
    """The figure as a base64 PNG string; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")
