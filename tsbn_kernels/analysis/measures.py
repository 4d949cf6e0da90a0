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


def finite_gramians(gramians: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """The [S, T, T] stack of the recorded Gramians that are finite. A float16 run records the Gramian of a step
    whose gradients overflowed (the GradScaler skipped it) as inf/NaN; left in, one such step makes the mean NaN
    and summary.json invalid JSON."""
    stack = np.asarray(gramians, dtype=np.float64)
    if stack.ndim == 2:
        stack = stack[None]
    return stack[np.isfinite(stack).all(axis=(1, 2))]


def gradient_cosine(gramians: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Mean over the recorded steps with a finite Gramian of cos(g_i, g_j) = M_ij / sqrt(M_ii·M_jj); NaN when
    none is finite."""
    stack = finite_gramians(gramians)
    if not len(stack):
        size = np.asarray(gramians).shape[-1]
        return np.full((size, size), np.nan)
    diag = np.sqrt(np.maximum(np.einsum("sii->si", stack), 1e-30))
    return (stack / (diag[:, :, None] * diag[:, None, :])).mean(axis=0)


def summary(layers: Sequence[LayerGates], tau: float = 0.5, gramians=None) -> dict:
    per_layer = {layer.name: {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                              for k, v in capacity(layer, tau).items()} for layer in layers}
    out = {"tau": tau, "num_tasks": layers[0].num_tasks, "layers": per_layer,
           "affinity": {k: v.tolist() for k, v in gate_affinity(layers, tau).items()}}
    if gramians is not None and len(finite_gramians(gramians)):
        out["gradient_cosine"] = gradient_cosine(gramians).tolist()
    return out
