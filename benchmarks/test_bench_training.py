"""Per-task gradients and whole training steps on a converted multi-task conv net (replicated batch).

"per_task_grads": the T per-task gradients of the shared parameters from one backward (OneBackward) against T
autograd passes, next to one ordinary backward of the summed loss (the cost floor). "train_step": a full PCGrad
step, eager (reference norms, T backward passes, LibMTL-style projection loop) against fused (fused norms, one
backward, Gramian aggregation). The model is a small ResNet-style stand-in at CelebA-like resolution until the
pipeline's benchmark models land (issue 6); its layer shapes live here.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tsbn_kernels as tk
from benchmarks.conftest import DEVICE
from benchmarks.shapes import SMOKE
from benchmarks.test_bench_mtl import libmtl_pcgrad
from tsbn_kernels import mtl

T, N = 3, (2 if SMOKE else 16)
WIDTH, SIZE = (8, 8) if SMOKE else (64, 32)


def make_model(backend: str) -> nn.Module:
    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    body = nn.Sequential(*block(3, WIDTH, 1), *block(WIDTH, WIDTH, 1), *block(WIDTH, 2 * WIDTH, 2),
                         *block(2 * WIDTH, 2 * WIDTH, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2 * WIDTH, 2 * WIDTH))
    torch.manual_seed(0)
    model = tk.convert_batchnorm(body, T).to(DEVICE)
    for m in model.modules():
        if isinstance(m, tk.modules._TSBatchNorm):
            m.backend = backend
    return model


def task_losses(model, heads, x, y):
    feats = model(x.repeat(T, 1, 1, 1)).view(T, x.shape[0], -1)
    return torch.stack([nn.functional.mse_loss(heads[t](feats[t]).squeeze(1), y[t]) for t in range(T)])


def setup(backend="auto"):
    model = make_model(backend)
    heads = nn.ModuleList(nn.Linear(2 * WIDTH, 1) for _ in range(T)).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 3, SIZE, SIZE, generator=g).to(DEVICE)
    y = torch.randn(T, N, generator=g).to(DEVICE)
    shared = [p for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters()]
    return model, heads, x, y, shared


@pytest.mark.parametrize("contender", ["one_backward", "per_task_loop", "ordinary_backward"])
def test_per_task_grads(benchmark, measure, contender):
    model, heads, x, y, shared = setup()
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def step():
        if contender == "one_backward":
            with mtl.OneBackward(model, T, modules=convs) as capture:
                losses = task_losses(model, heads, x, y)
            return capture.gradients(losses)[0]
        losses = task_losses(model, heads, x, y)
        if contender == "per_task_loop":
            return mtl.autograd_gradients(losses, shared)
        return torch.autograd.grad(losses.sum(), shared)
    params = sum(p.numel() for p in shared)
    measure(benchmark, step, bytes_moved=T * params * 4, group=f"per_task_grads/T{T}-N{N}-{SIZE}px",
            contender=contender, ours=contender == "one_backward", rounds=(5, 1))


@pytest.mark.parametrize("contender", ["fused", "eager"])
def test_train_step(benchmark, measure, contender):
    model, heads, x, y, shared = setup("auto" if contender == "fused" else "eager")
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    optimizer = torch.optim.Adam(list(model.parameters()) + list(heads.parameters()), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    head_params = list(heads.parameters()) + [p for m in model.modules()
                                               if isinstance(m, tk.modules._TSBatchNorm) for p in m.parameters()]

    def step():
        optimizer.zero_grad(set_to_none=True)
        if contender == "fused":
            with mtl.OneBackward(model, T, modules=convs) as capture:
                losses = task_losses(model, heads, x, y)
            mtl.backward_aggregated(losses, method="pcgrad", capture=capture, task_params=head_params,
                                    generator=generator)
        else:
            losses = task_losses(model, heads, x, y)
            G = mtl.autograd_gradients(losses, shared)
            direction = libmtl_pcgrad(G, generator)
            offset = 0
            for p in shared:
                p.grad = direction[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            for p, g in zip(head_params, torch.autograd.grad(losses.sum(), head_params)):
                p.grad = g
        optimizer.step()
    measure(benchmark, step, bytes_moved=sum(p.numel() for p in shared) * 4 * (2 * T + 1),
            group=f"train_step/pcgrad-T{T}-N{N}-{SIZE}px", contender=contender, ours=contender == "fused",
            rounds=(5, 1))


def test_models_agree():
    """Not a timing: the two train-step contenders compute the same first update."""
    fused, heads_f, x, y, _ = setup("auto")
    eager = copy.deepcopy(fused)
    for m in eager.modules():
        if isinstance(m, tk.modules._TSBatchNorm):
            m.backend = "eager"
    torch.testing.assert_close(task_losses(fused, heads_f, x, y), task_losses(eager, heads_f, x, y), rtol=1e-4,
                               atol=1e-5)
