"""tsbn-kernels: task-specific (sigmoid) normalization for multi-task learning, with fused kernels.

See DESIGN.md §2 of the project for the public API; everything importable from here is public.
"""
from __future__ import annotations

import torch

from . import _extension, reference  # _extension: loads the compiled ops, if built
from ._version import __version__
from .context import task_ids
from .convert import convert_batchnorm, convert_layernorm, gate_param_groups
from .dispatch import available_backends
from .functional import ts_batch_norm, ts_layer_norm
from .modules import TSBatchNorm, TSBatchNorm1d, TSBatchNorm2d, TSBatchNorm3d, TSLayerNorm

__all__ = [
    "TSBatchNorm", "TSBatchNorm1d", "TSBatchNorm2d", "TSBatchNorm3d", "TSLayerNorm", "__version__",
    "available_backends", "convert_batchnorm", "convert_layernorm", "gate_param_groups", "reference", "task_ids", "ts_batch_norm",
    "ts_layer_norm",
]


def __getattr__(name: str):
    # Subpackages with heavier imports load on first use: tk.mtl, tk.pipeline, tk.analysis.
    if name in ("mtl", "pipeline", "analysis"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
