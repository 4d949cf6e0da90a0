"""Peak memory of a block of code: the most tensor memory it had allocated at once, beyond what was allocated before.

On CUDA this is the caching allocator's statistics: ``torch.cuda.max_memory_allocated`` less the bytes allocated at
entry (what the block frees of the older memory lowers it). PyTorch keeps no such statistics for the CPU, so there
the block runs under the profiler with ``profile_memory=True``, which reports the CPU allocator's allocations and
frees: those of the tensors the block makes, and also the scratch memory that ops allocate and free inside
themselves (a convolution's column buffers, a backward's contiguous copies), which on CUDA the allocator's peak
holds too. The peak is the largest sum, in time order, of the blocks allocated inside the block and not yet freed.
Frees are matched to those allocations by address and the others are left out: the allocator's size table is
only kept while some profiler runs, so a free of older memory may come with no size or with a stale one from an
earlier profiled block whose address was reused. The two devices then agree when the block frees nothing older
than itself (clear gradients with set_to_none before it, not inside); PyTorch logs a warning the first time it
sees a free of unknown size in a process. The profiler hears of the allocations made on the thread it runs on: an
op's scratch taken inside its OpenMP workers is seen from the calling thread's share only (one per-thread chunk
buffer of this package's CPU gramian; the [blocks, C] partial tables of its batch norm are allocated before the
parallel loop and seen whole), and memory outside PyTorch's allocator not at all. The profiler costs time per op,
so time a block in a separate run.
"""
from __future__ import annotations

import torch
from torch._C._profiler import _ExtraFields_Allocation
from torch.profiler import ProfilerActivity, profile


def _cpu_peak_bytes(result) -> int:
    allocations = []           # (time, address, bytes: > 0 allocated, < 0 freed)
    events = list(result.experimental_event_tree())
    while events:
        event = events.pop()
        events.extend(event.children)
        fields = event.extra_fields
        if isinstance(fields, _ExtraFields_Allocation) and fields.device.type == "cpu":
            allocations.append((event.start_time_ns, fields.ptr, fields.alloc_size))
    # In time order; at equal times an allocation before a free, so that a block's own free follows it.
    allocations.sort(key=lambda a: (a[0], a[2] < 0))
    live: dict[int, int] = {}
    total = peak = 0
    for _, address, nbytes in allocations:
        if nbytes > 0:
            total += nbytes - live.get(address, 0)   # (an address allocated twice unseen-freed: counted once)
            live[address] = nbytes
            peak = max(peak, total)
        elif address in live:
            total -= live.pop(address)
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
            self.peak_bytes = _cpu_peak_bytes(self._profiler.profiler.kineto_results)
            self._profiler = None
        else:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
