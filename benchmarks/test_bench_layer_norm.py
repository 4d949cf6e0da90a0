"""ts_layer_norm at ViT-S shapes (PASCAL-Context, T=5, 1024 tokens, D=384): every backend against eager
F.layer_norm followed by the per-task gate multiply (what a user would write without this package)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tsbn_kernels as tk
from benchmarks.conftest import DEVICE
from benchmarks.shapes import layer_norm_cases

OURS = tk.available_backends(DEVICE, "ts_layer_norm")
BASELINES = ["layer_norm_then_gate"]
PASSES = {"forward": 2, "forward_backward": 5}


def contender_fn(name, weight, num_tasks):
    if name in OURS:
        return lambda x: tk.ts_layer_norm(x, weight, backend=name)

    def layer_norm_then_gate(x):
        n = x.shape[0] // num_tasks
        gate = weight.sigmoid().repeat_interleave(n, dim=0).unsqueeze(1)
        return F.layer_norm(x, x.shape[-1:]) * gate
    return layer_norm_then_gate


@pytest.mark.parametrize("contender", OURS + BASELINES)
@pytest.mark.parametrize("pass_", list(PASSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", layer_norm_cases(DEVICE), ids=lambda c: c.id)
def test_ts_layer_norm(benchmark, measure, case, dtype, pass_, contender):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(case.num_tasks, case.shape[-1], generator=g).to(DEVICE)
    fn = contender_fn(contender, weight, case.num_tasks)

    def make_step():
        x = torch.randn(case.shape, generator=g).to(device=DEVICE, dtype=dtype)
        if pass_ == "forward_backward":
            x.requires_grad_(True)
            grad = torch.randn(case.shape, generator=g).to(device=DEVICE, dtype=dtype)

            def step():
                return torch.autograd.grad(fn(x), x, grad)
        else:
            def step():
                with torch.no_grad():
                    return fn(x)
        return step

    numel = 1
    for d in case.shape:
        numel *= d
    measure(benchmark, make_step(), rotate=make_step,
            bytes_moved=PASSES[pass_] * numel * torch.finfo(dtype).bits // 8,
            group=f"ts_layer_norm/{pass_}/{case.id}/{str(dtype)[6:]}", contender=contender,
            ours=contender not in BASELINES and contender != "eager", shape=list(case.shape),
            num_tasks=case.num_tasks)
