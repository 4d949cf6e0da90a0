"""Capacity allocation, filter specialization and task relationships from gates (and Gramians)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .gates import LayerGates


def capacity(layer: LayerGates, tau: float = 0.5) -> dict:
    """Fractions of the layer's channels: open (σ > τ) per task, shared (open for ≥ 2 tasks), private to each
    task (open for that task only: filter specialization), and closed for every task."""
    open_ = layer.values > tau
    open_count = open_.sum(axis=0)
    private = open_ & (open_count == 1)[None, :]
    return {
        "open": open_.mean(axis=1),
        "shared": float((open_count >= 2).mean()),
        "private": private.mean(axis=1),
        "specialized": float((open_count == 1).mean()),
        "closed": float((open_count == 0).mean()),
    }


def gate_affinity(layers: Sequence[LayerGates], tau: float = 0.5) -> dict[str, np.ndarray]:
    """T×T task affinities over all layers: cosine of the concatenated gate vectors, and the overlap (Jaccard
    index) of the sets of open channels."""
    vectors = np.concatenate([layer.values for layer in layers], axis=1)
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    open_ = vectors > tau
    inter = open_.astype(float) @ open_.T.astype(float)
    sizes = open_.sum(axis=1)
    union = sizes[:, None] + sizes[None, :] - inter
    return {"cosine": unit @ unit.T, "overlap": np.where(union > 0, inter / np.maximum(union, 1), 1.0)}


def gradient_cosine(gramians: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Mean over the recorded steps of cos(g_i, g_j) = M_ij / sqrt(M_ii·M_jj)."""
    stack = np.asarray(gramians, dtype=np.float64)
    if stack.ndim == 2:
        stack = stack[None]
    diag = np.sqrt(np.maximum(np.einsum("sii->si", stack), 1e-30))
    return (stack / (diag[:, :, None] * diag[:, None, :])).mean(axis=0)


def summary(layers: Sequence[LayerGates], tau: float = 0.5, gramians=None) -> dict:
    per_layer = {layer.name: {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                              for k, v in capacity(layer, tau).items()} for layer in layers}
    out = {"tau": tau, "num_tasks": layers[0].num_tasks, "layers": per_layer,
           "affinity": {k: v.tolist() for k, v in gate_affinity(layers, tau).items()}}
    if gramians is not None and len(gramians):
        out["gradient_cosine"] = gradient_cosine(gramians).tolist()
    return out
