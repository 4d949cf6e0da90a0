"""Timing and bandwidth plumbing shared by every benchmark file.

Each benchmark calls ``measure(benchmark, fn, bytes_moved=..., group=...)``. The ideal bytes of DESIGN.md §4,
the achieved GB/s and its fraction of the device-to-device copy bandwidth measured in the same session go into
``extra_info`` for ``python -m benchmarks.report``.

CPU: pytest-benchmark times ``fn`` with the host clock; the median is the result.
CUDA: pytest-benchmark still runs a few synchronised host-timed rounds (kept in its JSON as host time), and the
result is the device time with do_bench semantics, in ``extra_info["device_median_s"]``:

* ``fn`` is warmed up first (module loading, Triton compilation, cuBLAS handles stay out of the numbers);
* when one call moves less than ``GRAPH_BYTES``, launch gaps would dominate: the calls are captured in a CUDA
  graph and its replays timed with CUDA events (``triton.testing.do_bench_cudagraph``, median). Repeated calls
  on one input would then read it from L2, so ``rotate`` (a function returning a fresh ``fn`` over fresh
  inputs) supplies enough input sets to exceed the L2 cache several times, and one graph replay walks through
  all of them. A contender that synchronises with the host (a LibMTL loop) cannot be captured: it falls back;
* otherwise (or when the capture fails) ``triton.testing.do_bench`` (CUDA events around each call, the L2
  cache flushed before each one, median).

``extra_info["timing"]`` says which of "host", "cuda_graph" or "events" produced the number.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import pytest
import torch

from benchmarks.shapes import SMOKE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Below this many bytes per call a GPU kernel runs for tens of microseconds, the order of its launch cost.
GRAPH_BYTES = 64 << 20
MAX_ROTATION = 32


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 50 << 20))


def rotation_count(bytes_moved: int, cache_bytes: int) -> int:
    """How many input sets make one pass over them read at least three times the cache from memory."""
    return max(1, min(MAX_ROTATION, math.ceil(3 * cache_bytes / max(bytes_moved, 1))))


def device_time(fn: Callable[[], object], bytes_moved: int, rotate: Callable[[], Callable] | None = None,
                graph: bool = True) -> tuple[float, str]:
    """(median seconds per call, how it was timed) on the current CUDA device."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    if graph and bytes_moved < GRAPH_BYTES:
        fns = [fn] + ([rotate() for _ in range(rotation_count(bytes_moved, l2_bytes()) - 1)] if rotate else [])
        for f in fns[1:]:
            f()

        def walk():
            for f in fns:
                f()
        try:
            ms = triton.testing.do_bench_cudagraph(walk, rep=100, return_mode="median")
            return ms / len(fns) / 1e3, "cuda_graph"
        except RuntimeError:             # a host synchronisation inside fn: not capturable
            torch.cuda.synchronize()
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return ms / 1e3, "events"


def _time_copy(numel: int, repeats: int) -> float:
    src = torch.randn(numel, device=DEVICE)
    dst = torch.empty_like(src)
    if DEVICE == "cuda":
        return 2 * numel * 4 / device_time(lambda: dst.copy_(src), 2 * numel * 4, graph=False)[0] / 1e9
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * numel * 4 / sorted(times)[len(times) // 2] / 1e9


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy (read + write), median of repeats; larger than any L2/L3."""
    numel = (1 << 20) if SMOKE else ((1 << 30) // 4 if DEVICE == "cuda" else (128 << 20) // 4)
    return _time_copy(numel, 5 if SMOKE else 20)


def rounds_for(bytes_moved: int) -> tuple[int, int]:
    """(rounds, warmup) of the host-timed rounds, sized so the 2-core CPU suite stays within its time budget."""
    if SMOKE:
        return 2, 1
    if DEVICE == "cuda":
        return 5, 1
    return (3, 1) if bytes_moved > (64 << 20) else (7, 2)


@pytest.fixture
def measure(copy_bandwidth):
    def run(benchmark, fn, *, bytes_moved: int, group: str, rounds: tuple[int, int] | None = None,
            rotate: Callable[[], Callable] | None = None, graph: bool = True, **info):
        benchmark.group = group
        rounds, warmup = rounds_for(bytes_moved) if rounds is None or SMOKE else rounds

        def target():
            fn()
            synchronize()

        benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup, iterations=1)
        median, timing = benchmark.stats.stats.median, "host"
        if DEVICE == "cuda" and not SMOKE:
            median, timing = device_time(fn, bytes_moved, rotate, graph)
        gbps = bytes_moved / median / 1e9
        benchmark.extra_info.update(info)
        benchmark.extra_info.update(bytes=bytes_moved, gbps=gbps, copy_gbps=copy_bandwidth,
                                    copy_fraction=gbps / copy_bandwidth, device=DEVICE, timing=timing,
                                    device_median_s=median,
                                    device_name=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu")
        return gbps

    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    """Which build of our C++ CPU kernels ran and torch's CPU capability: the CPU figures depend on both."""
    from tsbn_kernels import _extension

    machine_info["tsbn_cpu_isa"] = _extension.cpu_isa()
    machine_info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
