"""pipeline.memory.PeakMemory on the CPU: the peak of the bytes the block had allocated at once, exactly, whatever
existed before it; views and in-place results add nothing; autograd's backward and the scratch memory an op
allocates inside itself are seen. (The blocks use tensor operands only: a Python scalar operand is wrapped in a
16-byte tensor, which the profiler rightly counts.)"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tsbn_kernels as tk
from tsbn_kernels.mtl import gramian
from tsbn_kernels.pipeline.memory import PeakMemory

F64 = 8


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=8), data=st.data())
def test_peak_is_the_largest_sum_of_live_fresh_tensors(sizes, data):
    """Random allocations and frees: the peak equals the running maximum of the live bytes computed by hand."""
    before = torch.randn(4096, dtype=torch.float64)          # alive at entry: never counted
    keep, live, want = [], 0, 0
    with PeakMemory("cpu") as m:
        for n in sizes:
            keep.append(torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)))
            live += n * F64
            want = max(want, live)
            keep[-1].mul_(keep[-1])                           # in place: same storage
            assert keep[-1].view(-1)[: max(1, n // 2)].numel()   # a view: same storage
            before.add_(before)
            if keep and data.draw(st.booleans(), label="free one"):
                gone = keep.pop(data.draw(st.integers(0, len(keep) - 1), label="which"))
                live -= gone.numel() * F64
                del gone
    assert m.peak_bytes == want


def test_a_temporary_counts_while_it_lives_and_what_existed_before_does_not():
    x = torch.randn(500, 500, dtype=torch.float64)            # 2 MB before the block
    with PeakMemory("cpu") as m:
        y = x @ x                                             # +2 MB
        z = y * x                                             # +2 MB: 4 MB live
        del z
        y.add_(x)
        w = torch.empty(250, 500, dtype=torch.float64)        # +1 MB: 3 MB live, below the peak
    assert m.peak_bytes == 4 * 500 * 500 * F64 // 2 and w.numel()


def test_backward_allocations_are_tracked():
    layer = torch.nn.Linear(256, 256, dtype=torch.float64)
    x = torch.randn(512, 256, dtype=torch.float64, requires_grad=True)
    activations = 512 * 256 * F64
    with PeakMemory("cpu") as m:
        layer(x).relu().sum().backward()
    # the forward keeps its output for relu's backward; the backward adds x.grad and the weight's gradient
    assert m.peak_bytes >= 2 * activations + 256 * 256 * F64
    assert x.grad is not None


@torch.library.custom_op("tsbn_test::sum_of_a_scratch_copy", mutates_args=())
def _sum_of_a_scratch_copy(x: torch.Tensor) -> torch.Tensor:
    scratch = x.repeat(4)                                     # 4x x's bytes, freed before the op returns
    return scratch.sum()


def test_scratch_memory_inside_an_op_is_seen():
    """An op's temporaries count while they live, though the op returns only a scalar: a fused kernel's partial
    tables or a convolution's column buffers hold memory as a tensor does."""
    x = torch.randn(2**16, dtype=torch.float64)
    with PeakMemory("cpu") as m:
        s = _sum_of_a_scratch_copy(x)
    assert m.peak_bytes >= 4 * x.numel() * F64 and s.numel() == 1


CPU_KERNELS = pytest.mark.skipif("cpu" not in tk.available_backends("cpu"), reason="the C++ CPU kernels are not built")


@CPU_KERNELS
def test_the_cpu_batch_norm_partials_are_seen():
    """The C++ kernels take their scratch from torch's allocator, as ATen's kernels do: a channels-last forward
    holds the [blocks, C] mean and M2 partials of its moments while y lives (blocks of kInterleavedBlockValues =
    16384 values of whole rows)."""
    N, C, H, W = 4, 64, 64, 64
    x = torch.randn(N, C, H, W).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(2, C)
    blocks = N * (H * W) // (16384 // C)
    with PeakMemory("cpu") as m:
        y = tk.ts_batch_norm(x, weight, num_tasks=2, backend="cpu")
    assert m.peak_bytes >= (y.numel() + 2 * blocks * C) * 4


@CPU_KERNELS
def test_the_cpu_gramian_chunk_buffer_is_seen():
    """gramian converts T rows of a 2048-column chunk into an fp32 buffer per thread: the calling thread's is
    seen (the profiler hears of its own thread's allocations only), though the [T, T] result and its float64 sums
    are 1/17 of it."""
    T, P = 40, 2048 * 40
    G = torch.randn(T, P, dtype=torch.bfloat16)
    with PeakMemory("cpu") as m:
        M = gramian(G, backend="cpu")
    assert m.peak_bytes >= T * 2048 * 4 and M.shape == (T, T)


@pytest.mark.parametrize("older", ["allocated under an earlier profiled block", "allocated unprofiled"])
def test_a_free_of_memory_older_than_the_block_does_not_lower_its_peak(older):
    """The profiler reports a free of older memory with its size where an earlier profiled block allocated it (or
    a stale size where such a block's address was reused): only the block's own allocations count."""
    if older == "allocated unprofiled":
        old = [torch.randn(2**16, dtype=torch.float64)]
    else:
        with PeakMemory("cpu"):
            old = [torch.randn(2**16, dtype=torch.float64)]
    with PeakMemory("cpu") as m:
        old.pop()
        y = torch.empty(2**10, dtype=torch.float64)
    assert m.peak_bytes == 2**10 * F64 and y.numel()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA allocator statistics need a GPU")
def test_cuda_peak_is_above_what_was_allocated_at_entry():
    before = torch.empty(2**20, device="cuda")
    with PeakMemory("cuda") as m:
        y = torch.empty(2**18, dtype=torch.float64, device="cuda")
        del y
    assert m.peak_bytes == 2**18 * F64 and before.numel()
