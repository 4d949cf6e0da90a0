"""What the Triton kernels need to know about the device they have to fill."""
from __future__ import annotations

import functools

import torch
import triton.language as tl
from torch import Tensor

from ..reference import accumulation_dtype

# SMs assumed for CPU tensors: the TRITON_INTERPRET=1 tests keep it small so that their small shapes are still cut
# into several programs; the offline sm_90 compile check (tests/triton_sm90.py) sets an H100's 132.
SIMULATED_MULTIPROCESSORS = 2


@functools.lru_cache(maxsize=None)
def _cuda_multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return SIMULATED_MULTIPROCESSORS
    return _cuda_multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def target_programs(device: torch.device, per_multiprocessor: int = 8) -> int:
    """Programs for one pass: several per SM keep every SM busy through the tail of the grid."""
    return per_multiprocessor * multiprocessors(device)


def task_of_samples(task_ids: Tensor | None, batch: int, num_tasks: int, device: torch.device) -> Tensor:
    """int32 task of every sample: the given ids, or task-major blocks of batch / num_tasks samples."""
    if task_ids is not None:
        return task_ids.to(torch.int32)
    return torch.arange(batch, device=device, dtype=torch.int32) // max(batch // num_tasks, 1)


def accumulation_types(dtype: torch.dtype) -> tuple[torch.dtype, object]:
    """(torch dtype, Triton dtype) kernels accumulate in: float64 for float64 input, float32 otherwise."""
    acc = accumulation_dtype(dtype)
    return acc, tl.float64 if acc == torch.float64 else tl.float32
