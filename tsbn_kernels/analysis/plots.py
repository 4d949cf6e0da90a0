"""Matplotlib figures of the gate analysis; each function writes one PNG and returns its path."""
from __future__ import annotations

import pathlib
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .gates import LayerGates  # noqa: E402
from .measures import capacity  # noqa: E402


def gate_heatmaps(layers: Sequence[LayerGates], path, task_names=None) -> pathlib.Path:
    num_tasks = layers[0].num_tasks
    # 0.45 in per task made CelebA's 40 tasks × 20 layers a 30000-px-tall image: a panel is at most 2.5 in, and
    # labels only every `step`-th task where 7-pt labels would overlap.
    panel = min(0.45 * num_tasks, 2.5)
    step = max(1, int(np.ceil(num_tasks * 9 / (panel * 72))))
    names = task_names or [f"task {t}" for t in range(num_tasks)]
    fig, axes = plt.subplots(len(layers), 1, figsize=(10, panel * len(layers) + 1), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        order = np.argsort(-layer.values.mean(axis=0))
        im = ax.imshow(layer.values[:, order], aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(0, layer.num_tasks, step), list(names)[::step], fontsize=7)
        ax.set_title(f"{layer.name} ({layer.values.shape[1]} channels, sorted by mean gate)", fontsize=8)
        ax.set_xticks([])
    fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=0.6, label="gate")
    return _save(fig, path)


def capacity_bars(layers: Sequence[LayerGates], path, tau: float = 0.5) -> pathlib.Path:
    caps = [capacity(layer, tau) for layer in layers]
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(layers) + 2), 3.5))
    shared = np.array([c["shared"] for c in caps])
    specialized = np.array([c["specialized"] for c in caps])
    closed = np.array([c["closed"] for c in caps])
    ax.bar(x, shared, label="shared (open for ≥ 2 tasks)")
    ax.bar(x, specialized, bottom=shared, label="task-private (open for 1 task)")
    ax.bar(x, closed, bottom=shared + specialized, label="closed", color="lightgrey")
    ax.set_xticks(x, [layer.name for layer in layers], rotation=60, fontsize=6, ha="right")
    ax.set_ylabel(f"fraction of channels (τ = {tau})")
    ax.legend(fontsize=7)
    return _save(fig, path)


def matrix(values: np.ndarray, path, title: str, task_names=None, vmin=-1.0, vmax=1.0) -> pathlib.Path:
    fig, ax = plt.subplots(figsize=(4 + 0.2 * len(values), 3.5 + 0.2 * len(values)))
    im = ax.imshow(values, vmin=vmin, vmax=vmax, cmap="RdBu_r")
    names = task_names or [str(t) for t in range(len(values))]
    ax.set_xticks(range(len(values)), names, rotation=60, fontsize=7)
    ax.set_yticks(range(len(values)), names, fontsize=7)
    if len(values) <= 12:
        for i in range(len(values)):
            for j in range(len(values)):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)


def trajectories(steps: np.ndarray, trajectories: dict[str, np.ndarray], path, task_names=None) -> pathlib.Path:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, snaps in trajectories.items():          # snaps: [S, T, C]
        for t in range(snaps.shape[1]):
            label = f"{(task_names or [f'task {i}' for i in range(snaps.shape[1])])[t]}" if name == next(iter(
                trajectories)) else None
            ax.plot(steps, snaps[:, t].mean(axis=1), color=f"C{t}", alpha=0.6, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("mean gate per layer")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path) -> pathlib.Path:
    path = pathlib.Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
