"""Batch and streaming scoring of trained checkpoints (`python -m recsys_mamba.score`)."""
