"""What the Triton kernels need to know about the device they have to fill."""
from __future__ import annotations

import functools

import torch

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
