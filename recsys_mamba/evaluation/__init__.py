"""Evaluation report for trained checkpoints (issue #6): `python -m recsys_mamba.evaluate`."""

from recsys_mamba.evaluation.report import evaluate

__all__ = ["evaluate"]
