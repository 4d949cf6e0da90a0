"""``tk.task_ids(ids)``: per-sample task ids for every task-specific layer called inside the block.

A converted model's forward signature stays the one of the original model; the ids reach its norm layers
through this context instead of a new argument. The context is a plain module-level stack, so that
``torch.compile(fullgraph=True)`` traces through it (dynamo cannot trace ContextVar or threading.local);
it is therefore per process, not per thread: do not enter it from several threads at once.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import Tensor

_stack: list[Tensor | None] = []


@contextlib.contextmanager
def task_ids(ids: Tensor | None) -> Iterator[Tensor | None]:
    """Within the block, TS layers called without ``task_ids=`` use ``ids`` (None: task-major blocks)."""
    _stack.append(ids)
    try:
        yield ids
    finally:
        _stack.pop()


def current_task_ids() -> Tensor | None:
    return _stack[-1] if _stack else None
