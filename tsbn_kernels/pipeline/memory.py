"""Peak memory of a block of code: the most tensor memory it had allocated at once, beyond what was allocated before.

On CUDA this is the caching allocator's statistics: ``torch.cuda.max_memory_allocated`` less the bytes allocated at
entry (what the block frees of the older memory lowers it). PyTorch keeps no such statistics for the CPU, so there
the block runs under the profiler with ``profile_memory=True``, which reports every allocation and free of the CPU
allocator: those of the tensors the block makes, and also the scratch memory that ops allocate and free inside
themselves (a convolution's column buffers, a backward's contiguous copies), which on CUDA the allocator's peak
holds too. The peak is the largest running sum of these events in time order. The CPU allocator reports the size
of a free only for memory allocated while the profiler ran, so a free of older memory does not lower the sum (the
two devices then agree when the block frees nothing older than itself: clear gradients with set_to_none before
it, not inside); PyTorch logs a warning the first time that happens in a process. Memory outside PyTorch's
allocator (a C++ kernel's std::vector scratch: on this package's CPU kernels a few [blocks, C] tables) is not
seen. The profiler costs time per op, so time a block in a separate run.
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile


def _cpu_peak_bytes(events) -> int:
    cpu = torch.autograd.DeviceType.CPU
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == cpu)
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak


class PeakMemory:
    """Context manager: ``with PeakMemory(device) as m: ...`` leaves in ``m.peak_bytes`` how far the tensor memory
    allocated inside the block rose above what was allocated at entry (see the module docstring)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self._profiler: profile | None = None
        self._start = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._profiler is not None:
            self._profiler.__exit__(*exc)
            self.peak_bytes = _cpu_peak_bytes(self._profiler.profiler.kineto_results.events())
            self._profiler = None
        else:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
