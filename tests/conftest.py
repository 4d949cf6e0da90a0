"""Shared test helpers: input factories and dtype-aware tolerances."""
from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("tsbn", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "tsbn"))

TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


def tolerance(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


def make_input(shape, dtype=torch.float32, *, offset: float = 0.0, scale: float = 1.0, channels_last=False,
               generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """Random input with per-channel offsets around ``offset`` (|mean| >> std when offset >> scale)."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    if offset:
        channel_shift = torch.randn(shape[1], generator=generator, dtype=torch.float64).abs() + 1.0
        x = x + offset * channel_shift.reshape(1, -1, *([1] * (len(shape) - 2)))
    x = x.to(device=device, dtype=dtype)
    if channels_last and x.dim() == 3:   # channel-minor [N, C, L]: a [N, L, C] sequence transposed for BatchNorm1d
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def make_params(num_tasks: int, channels: int, dtype=torch.float32, *, bias=True, stats=True,
                generator: torch.Generator | None = None, device="cpu"):
    """weight, bias, running_mean, running_var of shape [T, C], all nonzero and task-distinct."""
    def rnd(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

    weight = rnd(num_tasks, channels)
    b = rnd(num_tasks, channels) if bias else None
    if stats:
        running_mean = rnd(num_tasks, channels) * 0.5
        running_var = (rnd(num_tasks, channels).abs() + 0.5)
    else:
        running_mean = running_var = None
    return weight, b, running_mean, running_var


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def ragged_task_ids(per_task: list[int], spatial, generator: torch.Generator, *, shuffle: bool = True):
    """Task ids of a ragged batch with per_task[t] samples of task t, in an order drawn from ``generator`` when
    ``shuffle``. A drawn batch that training would reject (empty, or a task with a single value per channel)
    gets two more samples per task. Returns the per-task sizes used and the ids."""
    spatial_size = math.prod(spatial)
    if sum(per_task) == 0 or any(n * spatial_size == 1 for n in per_task):
        per_task = [n + 2 for n in per_task]
    ids = torch.cat([torch.full((n,), t) for t, n in enumerate(per_task)])
    if shuffle:
        ids = ids[torch.randperm(ids.numel(), generator=generator)]
    return per_task, ids


@contextlib.contextmanager
def env_var(name: str, value: str | None):
    """The environment variable ``name`` set to ``value`` (None: unset) inside the block, restored after."""
    old = os.environ.get(name)
    try:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
