"""Training curves of a run: the mean training loss and the validation metrics of every epoch.

Read from the run's metrics.json (`epoch_history`, written by every train run whatever its loggers),
else from the CSV logger's `csv/metrics.csv` (runs trained before metrics.json held the curves)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

CSV_LOSS = ("train/loss_epoch", "train/loss")  # the CSV logger's column of the epoch's mean loss


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return None if value is None or math.isnan(value) else value


def from_csv(path: Path) -> list[dict[str, Any]]:
    """Per-epoch rows from a Lightning CSVLogger metrics.csv (one line per logging step or epoch end)."""
    rows: dict[int, dict[str, Any]] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        loss_column = next((c for c in CSV_LOSS if c in (reader.fieldnames or [])), None)
        for line in reader:
            epoch = _number(line.get("epoch"))
            if epoch is None:
                continue
            row = rows.setdefault(int(epoch), {"epoch": int(epoch)})
            loss = _number(line.get(loss_column)) if loss_column else None
            if loss is not None:
                row["train/loss"] = loss
            row.update(
                {
                    k: _number(v)
                    for k, v in line.items()
                    if k and k.startswith("val/") and _number(v) is not None
                }
            )
    return [rows[e] for e in sorted(rows)]


def read(run_folder: Path, training_metrics: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The run's epoch rows (`epoch`, `train/loss`, `val/...`); empty when the run recorded none."""
    history = (training_metrics or {}).get("epoch_history")
    if isinstance(history, list) and history:
        return [dict(r) for r in history if isinstance(r, dict) and "epoch" in r]
    logged = run_folder / "csv" / "metrics.csv"
    if logged.is_file():
        try:
            return from_csv(logged)
        except (OSError, csv.Error, UnicodeDecodeError):
            return []
    return []


def plots(curves: list[tuple[str, list[dict[str, Any]]]], monitor: str) -> dict[str, str]:
    """caption -> base64 PNG: training loss per epoch, and the monitored validation metric per epoch,
    one line per model (models without curves are left out of the legend)."""
    from recsys_mamba.figures import new_figure, png

    out = {}
    for key, title in (
        ("train/loss", "Training loss per epoch"),
        (monitor, f"Validation {monitor} per epoch"),
    ):
        drawn = [
            (name, [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]) for name, rows in curves
        ]
        drawn = [(name, points) for name, points in drawn if points]
        if not drawn:
            continue
        fig, ax = new_figure()
        for name, points in drawn:
            ax.plot([e for e, _ in points], [v for _, v in points], marker="o", label=name)
        ax.set(title=title, xlabel="epoch", ylabel=key)
        ax.legend(fontsize=8)
        out[title] = png(fig)
    return out


def table(curves: list[tuple[str, list[dict[str, Any]]]], monitor: str) -> tuple[list[str], list[list[Any]]]:
    """The same curves as a table (headers, rows): model, epoch, training loss, monitored metric."""
    rows = [
        [name, r["epoch"], r.get("train/loss"), r.get(monitor)] for name, history in curves for r in history
    ]
    return ["model", "epoch", "train/loss", monitor], rows
