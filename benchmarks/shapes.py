"""The one place for benchmark shapes: the norm layers of the four benchmarks' real models (DESIGN.md §5).

Batch-norm inputs are replicated batches, [T·N, C, H, W]. NYUv2 and Cityscapes: ResNet-50 with dilation
(output stride 8), the bottleneck outputs of layer1..4. CelebA: a small ResNet at 64×64. PASCAL-Context:
ViT-S tokens for TSσLN. Smoke mode (TSBN_BENCH_SMOKE=1) swaps in tiny shapes so `make test` runs in seconds.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

SMOKE = os.environ.get("TSBN_BENCH_SMOKE") == "1"


@dataclass(frozen=True)
class NormCase:
    name: str
    shape: tuple[int, ...]
    num_tasks: int
    on_cpu: bool = True   # part of the full CPU run (the 2-core machine has a 10-minute budget)

    @property
    def id(self) -> str:
        return f"{self.name}-{'x'.join(map(str, self.shape))}-T{self.num_tasks}"


def _resnet50_dilated(benchmark: str, tasks: int, n: int, height: int, width: int, cpu_layers=(1,)) -> list[NormCase]:
    stride4 = (height // 4, width // 4)
    stride8 = (height // 8, width // 8)
    layers = {1: (256, stride4), 2: (512, stride8), 3: (1024, stride8), 4: (2048, stride8)}
    return [NormCase(f"{benchmark}-layer{i}", (tasks * n, c, *hw), tasks, on_cpu=i in cpu_layers)
            for i, (c, hw) in layers.items()]


BATCH_NORM_CASES: list[NormCase] = (
    _resnet50_dilated("nyuv2", 3, 8, 288, 384, cpu_layers=(1, 2, 3, 4))
    + _resnet50_dilated("cityscapes", 2, 64, 128, 256, cpu_layers=(1,))
    + [NormCase("celeba-stage2", (40 * 8, 128, 16, 16), 40, on_cpu=True)]
)
LAYER_NORM_CASES: list[NormCase] = [NormCase("pascal-vits", (5 * 2, 1024, 384), 5)]

SMOKE_BATCH_NORM_CASES = [NormCase("smoke", (6, 16, 12, 10), 3), NormCase("smoke-odd", (9, 5, 9, 4), 3)]
SMOKE_LAYER_NORM_CASES = [NormCase("smoke-ln", (6, 33, 48), 3)]


def batch_norm_cases(device: str) -> list[NormCase]:
    if SMOKE:
        return SMOKE_BATCH_NORM_CASES
    return [c for c in BATCH_NORM_CASES if device != "cpu" or c.on_cpu]


def layer_norm_cases(device: str) -> list[NormCase]:
    return SMOKE_LAYER_NORM_CASES if SMOKE else LAYER_NORM_CASES


# Per-task gradient matrices G [T, P] for aggregation: NYUv2/Cityscapes-like T=3 and CelebA T=40 at 1e7 params.
AGGREGATION_CASES: list[tuple[int, int]] = [(3, 10_000_000), (40, 10_000_000)]
SMOKE_AGGREGATION_CASES: list[tuple[int, int]] = [(3, 20_000), (5, 3_000)]


def aggregation_cases() -> list[tuple[int, int]]:
    return SMOKE_AGGREGATION_CASES if SMOKE else AGGREGATION_CASES
