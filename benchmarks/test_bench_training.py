"""Per-task gradients and whole training steps on a converted multi-task conv net (replicated batch).

"per_task_grads": the T per-task gradients of the shared parameters from one backward (OneBackward) against T
autograd passes, next to one ordinary backward of the summed loss (the cost floor), on a small converted conv
net. "train_step": one full PCGrad step of each benchmark's pipeline model (tsbn_kernels.pipeline.models), eager
(reference norms, T backward passes, LibMTL-style projection loop) against fused (fused norms, one backward,
Gramian aggregation); real widths and resolutions on a GPU, reduced ones on the CPU.
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
            contender=contender, ours=contender == "one_backward", rounds=(5, 1), graph=False)


# A ViT-S-like encoder of torch's own layers (nn.TransformerEncoderLayer, batch-first, TSσLN): OneBackward splits
# its nn.MultiheadAttention through the functional forward of mtl.attention.
VIT_D, VIT_LAYERS, VIT_TOKENS, VIT_N = (16, 1, 8, 2) if SMOKE else (384, 4, 197, 4) if DEVICE == "cuda" else \
    (96, 2, 65, 4)


@pytest.mark.parametrize("contender", ["one_backward", "per_task_loop", "ordinary_backward"])
def test_per_task_grads_transformer(benchmark, measure, contender):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(VIT_D, max(VIT_D // 64, 2), 4 * VIT_D, dropout=0.0, batch_first=True,
                                       norm_first=True)
    encoder = tk.convert_layernorm(nn.TransformerEncoder(layer, VIT_LAYERS, enable_nested_tensor=False), T)
    encoder = encoder.to(DEVICE)
    heads = nn.ModuleList(nn.Linear(VIT_D, 1) for _ in range(T)).to(DEVICE)
    tokens = torch.randn(VIT_N, VIT_TOKENS, VIT_D, device=DEVICE)
    y = torch.randn(T, VIT_N, device=DEVICE)
    shared = [p for n, p in encoder.named_parameters() if "norm" not in n]

    def losses_of():
        feats = encoder(tokens.repeat(T, 1, 1))[:, 0].view(T, VIT_N, -1)
        return torch.stack([nn.functional.mse_loss(heads[t](feats[t]).squeeze(1), y[t]) for t in range(T)])

    def step():
        if contender == "one_backward":
            with mtl.OneBackward(encoder, T) as capture:
                losses = losses_of()
            return capture.gradients(losses)[0]
        losses = losses_of()
        if contender == "per_task_loop":
            return mtl.autograd_gradients(losses, shared)
        return torch.autograd.grad(losses.sum(), shared)
    params = sum(p.numel() for p in shared)
    measure(benchmark, step, bytes_moved=T * params * 4,
            group=f"per_task_grads/transformer-D{VIT_D}x{VIT_LAYERS}-T{T}-N{VIT_N}-L{VIT_TOKENS}",
            contender=contender, ours=contender == "one_backward", rounds=(5, 1), graph=False)


PIPELINE_SCALE = {  # benchmark: (width, (H, W), N) — GPU: the real model; CPU/smoke: small enough to run
    "nyuv2": (64, (288, 384), 2) if DEVICE == "cuda" else (8, (72, 96), 2),
    "cityscapes": (64, (128, 256), 8) if DEVICE == "cuda" else (8, (32, 64), 4),
    "celeba": (64, (64, 64), 64) if DEVICE == "cuda" else (8, (32, 32), 8),
    "pascal": (64, (512, 512), 4) if DEVICE == "cuda" else (8, (128, 128), 2),
}
# On a GPU the step runs as issue 6 states its target: bf16 autocast and channels-last activations.
AMP = torch.bfloat16 if DEVICE == "cuda" else None


def pipeline_step(benchmark: str, contender: str):
    from tsbn_kernels.pipeline import check, losses, models

    width, size, n = PIPELINE_SCALE[benchmark]
    if SMOKE:
        width, size, n = 4, (16, 16), 2
    torch.manual_seed(0)
    model = models.build_model(benchmark, width=width, head_width=4 * width, image_size=size,
                               backend="auto" if contender == "fused" else "eager").to(DEVICE)
    channels_last = AMP is not None and benchmark != "celeba"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Both contenders run the stem once (mtl.replicate); the shared parameters are what tsbn-train aggregates.
    convs = model.split_layers()
    shared = model.shared_parameters()
    before_replication = model.before_replication_parameters()
    shared_ids = {id(p) for p in shared}
    task_params = [p for p in model.parameters() if id(p) not in shared_ids]
    batch = check.random_batch(benchmark, n, size, torch.Generator().manual_seed(0))
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    if channels_last:
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    losses_fn = losses.losses_for(benchmark)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    generator = torch.Generator(device=DEVICE).manual_seed(0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=AMP, enabled=AMP is not None):
            if contender == "fused":
                with mtl.OneBackward(model, model.num_tasks, modules=convs,
                                     before_replication=before_replication) as capture:
                    task_losses = losses_fn(model(batch["image"]), batch).float()
            else:
                task_losses = losses_fn(model(batch["image"]), batch).float()
        if contender == "fused":
            mtl.backward_aggregated(task_losses, method="pcgrad", capture=capture, task_params=task_params,
                                    generator=generator)
        else:
            direction = libmtl_pcgrad(mtl.autograd_gradients(task_losses, shared), generator)
            offset = 0
            for p in shared:
                p.grad = direction[offset:offset + p.numel()].view_as(p).to(p.dtype).clone()
                offset += p.numel()
            for p, grad in zip(task_params, torch.autograd.grad(task_losses.sum(), task_params, allow_unused=True)):
                p.grad = grad
        optimizer.step()
    precision = "-bf16-cl" if channels_last else ""
    return step, sum(p.numel() for p in shared), f"{benchmark}-w{width}-{size[0]}x{size[1]}-N{n}{precision}"


@pytest.mark.parametrize("contender", ["fused", "eager"])
@pytest.mark.parametrize("dataset", list(PIPELINE_SCALE))
def test_train_step(benchmark, measure, dataset, contender):
    step, params, label = pipeline_step(dataset, contender)
    rounds = (1, 1) if dataset == "celeba" and contender == "eager" and DEVICE == "cpu" else (3, 1)
    measure(benchmark, step, bytes_moved=params * 4 * 3, group=f"train_step/pcgrad/{label}", contender=contender,
            ours=contender == "fused", rounds=rounds, graph=False)   # timed as a user's eager loop runs


def test_models_agree():
    """Not a timing: the two train-step contenders compute the same first update."""
    fused, heads_f, x, y, _ = setup("auto")
    eager = copy.deepcopy(fused)
    for m in eager.modules():
        if isinstance(m, tk.modules._TSBatchNorm):
            m.backend = "eager"
    torch.testing.assert_close(task_losses(fused, heads_f, x, y), task_losses(eager, heads_f, x, y), rtol=1e-4,
                               atol=1e-5)
