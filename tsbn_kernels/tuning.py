"""Measured choices for ``backend="auto"`` and for the Triton tile sizes, per device and shape.

Which of two fused backends is faster depends on the device, the dtype, the memory layout and the shape, and
only a measurement can tell. A tuning table records such measurements; ``choose`` answers from the nearest
measured shape (same op, pass, dtype and layout; nearest in log element count and log channel count).

Tables are JSON files::

    {"device_name": "NVIDIA H100 80GB HBM3", "commit": "...", "date": "...",
     "backend": [{"op": "ts_batch_norm", "training": true, "dtype": "bfloat16", "layout": "channels_last",
                  "numel": 42467328, "channels": 256, "best": "triton", "times": {"triton": 1.1e-3, ...}}, ...],
     "triton": [{"op": "ts_batch_norm", "training": true, "dtype": "bfloat16", "layout": "channels_last",
                 "numel": 42467328, "channels": 256, "best": {"block_c": 64, "block_s": 64, "num_warps": 4}}]}

``backend`` entries come from ``python -m benchmarks.report RESULTS.json --tuning-table FILE`` (the benchmark
suite's side-by-side medians), ``triton`` entries from ``python -m benchmarks.tune_triton --out FILE`` (a sweep
of tile configurations). The tables of the devices measured so far ship in ``tsbn_kernels/tuned/`` named after
the device (``tuned/nvidia-h100-80gb-hbm3.json``) and apply to that device only; ``TSBN_TUNING_TABLE=FILE``
uses FILE on every device instead. Without an entry, ``auto`` keeps its fixed order and Triton its heuristic.
"""
from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import re

import torch

TUNED_DIR = pathlib.Path(__file__).with_name("tuned")


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def layout_of(x: torch.Tensor) -> str:
    if x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        return "channels_last"
    if x.dim() == 5 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last_3d) \
            and not x.is_contiguous():
        return "channels_last"
    return "nchw"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=16)
def _load(path: str) -> dict:
    try:
        table = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"tuning table {path} cannot be read: {exc}") from exc
    if not isinstance(table, dict) or not all(isinstance(table.get(k, []), list) for k in ("backend", "triton")):
        raise ValueError(f"tuning table {path}: expected an object with 'backend' and 'triton' lists")
    return table


def table_for(device: torch.device | str) -> dict:
    """The tuning table that applies to ``device`` ({} when there is none)."""
    override = os.environ.get("TSBN_TUNING_TABLE")
    if override:
        return _load(override)
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    path = TUNED_DIR / f"{device_slug(torch.cuda.get_device_name(device))}.json"
    return _load(str(path)) if path.exists() else {}


def shape_key(op: str, x: torch.Tensor, training: bool) -> tuple[str, bool, str, str, int, int] | None:
    """What a table entry is matched on: (op, training, dtype, layout, element count, channel count). None while
    torch.compile traces: the shape may be symbolic there (dynamic shapes after a recompile), and a symbolic
    size cannot key a choice made once at trace time, so compiled code keeps the fixed order of AUTO_ORDER."""
    if torch.compiler.is_compiling():
        return None
    channels = x.shape[1] if op == "ts_batch_norm" else x.shape[-1]
    return op, bool(training), _dtype_name(x.dtype), layout_of(x), int(x.numel()), int(channels)


def _nearest(entries: list[dict], key: tuple, accept=lambda entry: True) -> dict | None:
    op, training, dtype, layout, numel, channels = key
    matching = [e for e in entries if e.get("op") == op and bool(e.get("training")) == training
                and e.get("dtype") == dtype and e.get("layout", "nchw") == layout and accept(e)]
    if not matching:
        return None

    def distance(e: dict) -> float:
        return abs(math.log2(max(numel, 1) / max(int(e["numel"]), 1))) \
            + abs(math.log2(max(channels, 1) / max(int(e["channels"]), 1)))
    return min(matching, key=distance)


def choose_backend(device: torch.device | str, key: tuple, candidates: list[str]) -> str | None:
    """The measured-fastest of ``candidates`` at the nearest measured shape (``shape_key``), or None."""
    entry = _nearest(table_for(device).get("backend", []), key, lambda e: e.get("best") in candidates)
    return None if entry is None else entry["best"]


def triton_config(op: str, x: torch.Tensor, training: bool) -> dict | None:
    """The swept Triton tile configuration nearest to x's shape, or None."""
    key = shape_key(op, x, training)
    entry = None if key is None else _nearest(table_for(x.device).get("triton", []), key)
    return None if entry is None else dict(entry["best"])
