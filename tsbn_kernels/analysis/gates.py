"""The learned gates of every task-specific norm layer, from a live model or from a saved state_dict.

A layer's gates are a [T, C] array of σ(w_t) (gate="sigmoid"). For TSBN (gate="none") the per-task scale is
an unbounded γ_t; its "gate" is |γ_t| divided by the layer's largest |γ|, so that thresholds compare alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class LayerGates:
    name: str
    values: np.ndarray   # [T, C] in [0, 1]
    kind: str            # "sigmoid" or "normalized |weight|"

    @property
    def num_tasks(self) -> int:
        return self.values.shape[0]


def _to_gates(weight: torch.Tensor, gate: str) -> tuple[np.ndarray, str]:
    w = weight.detach().float().cpu()
    if gate == "sigmoid":
        return torch.sigmoid(w).numpy(), "sigmoid"
    scale = w.abs().max().clamp_min(1e-12)
    return (w.abs() / scale).numpy(), "normalized |weight|"


def gates_from_module(model: nn.Module) -> list[LayerGates]:
    from ..modules import TSLayerNorm, _TSBatchNorm

    layers = []
    for name, m in model.named_modules():
        if isinstance(m, (_TSBatchNorm, TSLayerNorm)) and m.weight is not None:
            values, kind = _to_gates(m.weight.reshape(m.weight.shape[0], -1), m.gate)
            layers.append(LayerGates(name or "<root>", values, kind))
    if not layers:
        raise ValueError("the model has no task-specific norm layer with a gate (TSBatchNorm*/TSLayerNorm with "
                         "affine weights)")
    return layers


def gates_from_state_dict(state: dict, gate: str = "sigmoid", num_tasks: int | None = None) -> list[LayerGates]:
    """TS batch norms are recognised by `<p>.weight` [T, C] beside `<p>.num_batches_tracked` [T]; with
    ``num_tasks`` given, TS layer norms too (no buffers): `<p>.weight` [T, D] with no bias, or
    [T, *normalized_shape] with a bias of the same shape. A conv or linear layer with T outputs has a 1-D bias or
    none; a bias-free 2-D Linear with T outputs cannot be told from a TS layer norm by its state alone."""
    layers = []
    for key, value in state.items():
        if not key.endswith(".weight") and key != "weight":
            continue
        prefix = key[: -len("weight")]
        tracked = state.get(prefix + "num_batches_tracked")
        is_ts_bn = (isinstance(tracked, torch.Tensor) and tracked.dim() == 1 and value.dim() == 2
                    and value.shape[0] == tracked.shape[0])
        is_ts_ln = (num_tasks is not None and tracked is None and value.dim() >= 2 and value.shape[0] == num_tasks
                    and prefix + "running_mean" not in state and _looks_like_ts_layer_norm(state, prefix, value))
        if is_ts_bn or is_ts_ln:
            values, kind = _to_gates(value.reshape(value.shape[0], -1), gate)
            layers.append(LayerGates(prefix.rstrip(".") or "<root>", values, kind))
    if not layers:
        raise ValueError("no task-specific norm gates found in the state_dict (expected `<layer>.weight` [T, C] "
                         "beside `<layer>.num_batches_tracked` [T])")
    return layers


def _looks_like_ts_layer_norm(state: dict, prefix: str, weight: torch.Tensor) -> bool:
    # A ResNet conv with T output channels (NYUv2's 3-channel normal classifier at T=3, CelebA's 40-channel convs
    # at T=40) is [T, C_in, k, k] with a 1-D bias or none: its weights are no gates.
    bias = state.get(prefix + "bias")
    if isinstance(bias, torch.Tensor):
        return bias.shape == weight.shape
    return weight.dim() == 2
