"""Timing and bandwidth plumbing shared by every benchmark file.

Each benchmark calls ``measure(benchmark, fn, bytes_moved=..., group=...)``: pytest-benchmark times ``fn``
(synchronised on CUDA, so a round is the device time of the work plus one sync), and the ideal bytes of
DESIGN.md §4, the achieved GB/s and its fraction of the device-to-device copy bandwidth measured in the same
session go into ``extra_info`` for ``python -m benchmarks.report``.
"""
from __future__ import annotations

import time

import pytest
import torch

from benchmarks.shapes import SMOKE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _time_copy(numel: int, repeats: int) -> float:
    src = torch.randn(numel, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        synchronize()
        times.append(time.perf_counter() - start)
    return 2 * numel * 4 / sorted(times)[len(times) // 2] / 1e9


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy (read + write), median of repeats; larger than any L2/L3."""
    numel = (1 << 20) if SMOKE else ((256 << 20) // 4 if DEVICE == "cuda" else (128 << 20) // 4)
    return _time_copy(numel, 5 if SMOKE else 20)


def rounds_for(bytes_moved: int) -> tuple[int, int]:
    """(rounds, warmup) sized so the 2-core CPU suite stays within its time budget."""
    if SMOKE:
        return 2, 1
    if DEVICE == "cuda":
        return 50, 10
    return (3, 1) if bytes_moved > (64 << 20) else (7, 2)


@pytest.fixture
def measure(copy_bandwidth):
    def run(benchmark, fn, *, bytes_moved: int, group: str, rounds: tuple[int, int] | None = None, **info):
        benchmark.group = group
        rounds, warmup = rounds_for(bytes_moved) if rounds is None or SMOKE else rounds

        def target():
            fn()
            synchronize()

        benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup, iterations=1)
        median = benchmark.stats.stats.median
        gbps = bytes_moved / median / 1e9
        benchmark.extra_info.update(info)
        benchmark.extra_info.update(bytes=bytes_moved, gbps=gbps, copy_gbps=copy_bandwidth,
                                    copy_fraction=gbps / copy_bandwidth, device=DEVICE,
                                    device_name=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu")
        return gbps

    return run
