"""Figures as base64 PNG strings, so the HTML report needs no other files."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers
import matplotlib.pyplot as plt
from sklearn.metrics import precision_recall_curve, roc_curve

from recsys_mamba.evaluation.breakdown import KS, sigmoid
from recsys_mamba.evaluation.scoring import Scored
from recsys_mamba.evaluation.stats import reliability_bins


def _png(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def ctr_plots(models: list[Scored], n_bins: int) -> dict[str, str]:
    figs = {}
    for title in ("ROC curve", "Precision-recall curve", "Reliability diagram"):
        fig, ax = plt.subplots(figsize=(4.5, 4))
        for m in models:
            y, s = m.arrays["labels"], m.arrays["logits"]
            if title == "ROC curve" and y.min() != y.max():
                fpr, tpr, _ = roc_curve(y, s)
                ax.plot(fpr, tpr, label=m.name)
            elif title == "Precision-recall curve" and y.max() > 0:
                precision, recall, _ = precision_recall_curve(y, s)
                ax.plot(recall, precision, label=m.name)
            elif title == "Reliability diagram":
                bins = reliability_bins(y, sigmoid(s), n_bins)
                used = bins["count"] > 0
                ax.plot(bins["mean_prob"][used], bins["rate"][used], marker="o", label=m.name)
        if title != "Precision-recall curve":
            ax.plot([0, 1], [0, 1], ls=":", color="grey")
        xlabel, ylabel = {
            "ROC curve": ("false positive rate", "true positive rate"),
            "Precision-recall curve": ("recall", "precision"),
            "Reliability diagram": ("mean predicted probability", "observed click rate"),
        }[title]
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.legend(fontsize=8)
        figs[title] = _png(fig)
    return figs


def ranking_plots(models: list[Scored], metrics: list[dict[str, float]]) -> dict[str, str]:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for m, values in zip(models, metrics, strict=True):
        ax.plot(KS, [values[f"hr@{k}"] for k in KS], marker="o", label=f"{m.name} HR")
        ax.plot(KS, [values[f"ndcg@{k}"] for k in KS], marker="s", ls="--", label=f"{m.name} NDCG")
    ax.set(title="HR and NDCG by K", xlabel="K", ylabel="value", xticks=list(KS))
    ax.legend(fontsize=8)
    return {"HR and NDCG by K": _png(fig)}


def plots(models: list[Scored], metrics: list[dict[str, float]], n_bins: int) -> dict[str, str]:
    return ctr_plots(models, n_bins) if models[0].task == "ctr" else ranking_plots(models, metrics)
