"""The only place a model is built from a config or read from a checkpoint: pure torch, no Lightning,
so everything that serves a model can load one."""

from recsys_mamba.runs.build import build_encoder, build_head, build_model
from recsys_mamba.runs.bundle import load_run
from recsys_mamba.runs.checkpoint import FORMAT_VERSION, load_checkpoint, read_checkpoint, save_checkpoint
from recsys_mamba.runs.load import Run, data_settings, prepared_folder, run_config, run_folder

__all__ = [
    "FORMAT_VERSION",
    "Run",
    "build_encoder",
    "build_head",
    "build_model",
    "data_settings",
    "load_checkpoint",
    "load_run",
    "prepared_folder",
    "read_checkpoint",
    "run_config",
    "run_folder",
    "save_checkpoint",
]
