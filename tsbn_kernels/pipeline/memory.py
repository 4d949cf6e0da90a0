"""Peak memory of a block of code: the most tensor memory it had allocated at once, beyond what was allocated before.

On CUDA this is the caching allocator's statistics: ``torch.cuda.max_memory_allocated`` less the bytes allocated at
entry (what the block frees of the older memory lowers it). PyTorch keeps no such statistics for the CPU, so there
the bytes are tracked at the dispatcher, counting the block's own tensors only (the two agree when the block frees
nothing older than itself: clear gradients with set_to_none before it, not inside): every op that returns a fresh
tensor (a return without alias annotation in its schema: not a view, not an in-place or out= result) adds its
storage, counted once and dropped when the storage is freed; the peak is the largest sum of live storages seen when
one is added. Scratch memory an op allocates and frees inside itself (a fused kernel's partial sums, a custom op's
temporaries) is not seen; on the CPU kernels of this package it is a few [blocks, C] tables, small next to the
activations. The tracking costs Python time per op, so time a block in a separate run.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.multiprocessing.reductions import StorageWeakRef


class _FreshStorages(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}   # StorageImpl address -> (weak ref, bytes)
        self._total = 0        # bytes of the entries in _live, some possibly freed since the last sweep
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outputs = out if isinstance(out, (tuple, list)) and len(returns) > 1 else (out,)
        for ret, value in zip(returns, outputs):
            if ret.alias_info is None:
                for tensor in tree_flatten(value)[0]:
                    if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                        self._add(tensor.untyped_storage())
        return out

    def _add(self, storage) -> None:
        ref = StorageWeakRef(storage)
        # A weak ref keeps its StorageImpl object (not the data) allocated, so while an entry is held its address
        # names that storage alone: a known address is this storage, counted already.
        if ref.cdata in self._live:
            return
        nbytes = storage.nbytes()
        self._live[ref.cdata] = (ref, nbytes)
        self._total += nbytes
        # _total only overstates the live bytes (freed entries are dropped lazily), so a sweep is needed only when
        # it passes the peak: the exact sum then decides.
        if self._total > self.peak:
            for key in [k for k, (r, _) in self._live.items() if r.expired()]:
                self._total -= self._live.pop(key)[1]
            self.peak = max(self.peak, self._total)


class PeakMemory:
    """Context manager: ``with PeakMemory(device) as m: ...`` leaves in ``m.peak_bytes`` how far the tensor memory
    allocated inside the block rose above what was allocated at entry (see the module docstring)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self._mode: _FreshStorages | None = None
        self._start = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._mode = _FreshStorages()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self.peak_bytes = self._mode.peak
            self._mode = None
        else:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
