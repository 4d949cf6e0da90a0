"""Records gates and Gramians during training, for gate trajectories and the gradient-cosine matrix."""
from __future__ import annotations

import os
import pathlib

import numpy as np
import torch
from torch import nn

from .gates import gates_from_module


class TrainingRecorder:
    """``rec.record(step, model, gramian)`` snapshots every TS layer's gates (and the [T, T] Gramian of the
    step's per-task gradients when given); ``rec.save()`` (or ``close()``) writes RUN_DIR/analysis/record.npz
    atomically. ``append=True`` (a resumed run) starts from the snapshots an existing record.npz holds, so the
    file keeps the whole run; without it an existing file is replaced."""

    def __init__(self, run_dir: str | os.PathLike, append: bool = False):
        self.path = pathlib.Path(run_dir) / "analysis" / "record.npz"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.steps: list[int] = []
        self.gates: dict[str, list[np.ndarray]] = {}
        self.gramian_steps: list[int] = []
        self.gramians: list[np.ndarray] = []
        if append and self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as data:
                self.steps = [int(s) for s in data["steps"]]
                self.gramian_steps = [int(s) for s in data["gramian_steps"]]
                self.gramians = list(data["gramians"])
                names = sorted((k for k in data.files if k.startswith("name_")), key=lambda k: int(k[5:]))
                self.gates = {str(data[n]): list(data["gates_" + n[5:]]) for n in names}
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"cannot append to {self.path}: {exc}; move it away to start a new record") from exc

    def truncate(self, step: int) -> None:
        """Drop the snapshots taken after ``step`` (a resume from a checkpoint older than the record)."""
        keep = sum(s <= step for s in self.steps)
        self.steps = self.steps[:keep]
        self.gates = {name: snaps[:keep] for name, snaps in self.gates.items()}
        keep_gramians = sum(s <= step for s in self.gramian_steps)
        self.gramian_steps = self.gramian_steps[:keep_gramians]
        self.gramians = self.gramians[:keep_gramians]

    def record(self, step: int, model: nn.Module, gramian: torch.Tensor | None = None) -> None:
        self.steps.append(int(step))
        for layer in gates_from_module(model):
            self.gates.setdefault(layer.name, []).append(layer.values.astype(np.float32))
        if gramian is not None:
            self.gramian_steps.append(int(step))
            self.gramians.append(gramian.detach().double().cpu().numpy())

    def save(self) -> pathlib.Path:
        arrays = {"steps": np.asarray(self.steps), "gramian_steps": np.asarray(self.gramian_steps),
                  "gramians": np.asarray(self.gramians) if self.gramians else np.zeros((0, 0, 0))}
        for i, (name, snaps) in enumerate((n, s) for n, s in self.gates.items() if s):
            arrays[f"gates_{i}"] = np.stack(snaps)
            arrays[f"name_{i}"] = np.asarray(name)
        tmp = self.path.with_suffix(".tmp.npz")
        try:
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, self.path)
        except BaseException:   # an interrupt mid-write leaves no partial file
            tmp.unlink(missing_ok=True)
            raise
        return self.path

    def close(self) -> pathlib.Path:
        return self.save()

    def __enter__(self) -> "TrainingRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_record(path: str | os.PathLike) -> dict:
    with np.load(path, allow_pickle=False) as data:
        names = sorted((k for k in data.files if k.startswith("name_")), key=lambda k: int(k[5:]))
        return {"steps": data["steps"], "gramians": data["gramians"],
                "trajectories": {str(data[n]): data["gates_" + n[5:]] for n in names}}
