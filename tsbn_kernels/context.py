"""``tk.task_ids(ids)``: per-sample task ids for every task-specific layer called inside the block.

A converted model's forward signature stays the one of the original model; the ids reach its norm layers
through a context variable (thread- and asyncio-safe) instead of a new argument.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

from torch import Tensor

_current: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar("tsbn_task_ids", default=None)


@contextlib.contextmanager
def task_ids(ids: Tensor | None) -> Iterator[Tensor | None]:
    """Within the block, TS layers called without ``task_ids=`` use ``ids`` (None: task-major blocks)."""
    token = _current.set(ids)
    try:
        yield ids
    finally:
        _current.reset(token)


def current_task_ids() -> Tensor | None:
    return _current.get()
