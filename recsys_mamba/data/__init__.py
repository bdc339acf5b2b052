"""Behaviour logs -> cleaned, indexed event sequences (pure Polars; see `format` for the output contract)."""

from recsys_mamba.data.format import load_item_attributes, load_manifest
from recsys_mamba.data.pipeline import prepare

__all__ = ["load_item_attributes", "load_manifest", "prepare"]
