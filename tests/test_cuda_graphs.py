"""CUDA-graph capture of the fused paths (GPU only; run by benchmarks/gpu_check.sh on a lent GPU).

The norm ops in the task-major layout, the Gramian-based aggregation (check_finite=False) and a whole PCGrad /
UPGrad training step with one-backward per-task gradients are meant to run without host synchronisation, so
that a training step can be captured once and replayed. Each test captures, replays on fresh inputs copied
into the static buffers, and compares with the same computation run eagerly.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tsbn_kernels as tk
from conftest import make_input
from tsbn_kernels import mtl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
DEVICE = "cuda"
FUSED = [b for b in tk.available_backends(DEVICE) if b != "eager"] if torch.cuda.is_available() else []


def capture(fn, warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, object]:
    """Capture fn() after warm-up on a side stream (the documented recipe); returns the graph and its outputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("method", [m for m in mtl.METHODS if m != "pcgrad"])
def test_aggregate_replays(method):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    G = torch.randn(5, 100_003, device=DEVICE, generator=g)
    graph, out = capture(lambda: mtl.aggregate(G, method, check_finite=False))
    for _ in range(3):
        fresh = torch.randn(5, 100_003, device=DEVICE, generator=g)
        fresh[1] -= 0.7 * fresh[0]                                     # a conflicting pair
        G.copy_(fresh)
        graph.replay()
        torch.testing.assert_close(out, mtl.aggregate(fresh, method), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", mtl.METHODS)
def test_weightings_never_synchronise(method):
    """CUDA's sync debug mode turns any host synchronisation into an error: each weighting on a GPU Gramian (random
    and with exactly opposed tasks), and the whole aggregation with check_finite=False."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    G = torch.randn(5, 10_007, device=DEVICE, generator=g)
    opposed = G.clone()
    opposed[1] = -opposed[0]
    kwargs = {"generator": torch.Generator(device=DEVICE).manual_seed(1)} if method == "pcgrad" else {}
    for rows in (G, opposed):
        mtl.aggregate(rows, method, check_finite=False, **kwargs)    # warm-up: lazy imports, cuBLAS/cuSOLVER handles
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = mtl.aggregate(rows, method, check_finite=False, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(out).all()


def test_pcgrad_replays_with_its_own_random_orders():
    G = torch.randn(4, 50_000, device=DEVICE)
    G[1] -= G[0]
    graph, out = capture(lambda: mtl.aggregate(G, "pcgrad", check_finite=False))
    for _ in range(3):                # the task orders are drawn on the device, anew on every replay
        graph.replay()
        # PCGrad never points against the mean of the tasks it was given.
        assert torch.isfinite(out).all() and float(out @ G.mean(0)) >= -1e-5 * float(G.norm()) ** 2 / 4


@pytest.mark.skipif(not FUSED, reason="no fused backend built for CUDA")
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("per_sample_ids", [False, True])
def test_ts_batch_norm_training_replays(backend, channels_last, per_sample_ids):
    """Per-sample ids too: their values are checked on the host once per ids tensor (in the warm-up), so the
    captured step holds no synchronisation."""
    torch.manual_seed(0)
    module = tk.TSBatchNorm2d(24, num_tasks=3, activation="relu").to(DEVICE)
    module.backend = backend
    twin = copy.deepcopy(module)
    x = make_input((6, 24, 17, 19), offset=3.0, channels_last=channels_last, device=DEVICE).requires_grad_(True)
    ids = torch.tensor([2, 0, 2, 2, 1, 0], device=DEVICE) if per_sample_ids else None  # ragged: 2, 1, 3
    grad_y = torch.randn_like(x)

    def step():
        y = module(x, ids)
        dx, dw = torch.autograd.grad(y, (x, module.weight), grad_y)
        return y, dx, dw
    graph, (y, dx, dw) = capture(step)
    # Warm-up ran the op (a capture records without running): bring the twin's statistics to the same point.
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            twin.get_buffer(name).copy_(buffer)
    for seed in range(3):
        fresh = make_input(x.shape, offset=3.0 + seed, channels_last=channels_last, device=DEVICE,
                           generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            x.copy_(fresh)
        graph.replay()
        fresh.requires_grad_(True)
        y_want = twin(fresh, ids)
        dx_want, dw_want = torch.autograd.grad(y_want, (fresh, twin.weight), grad_y)
        torch.testing.assert_close(y, y_want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dx, dx_want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dw, dw_want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(module.running_mean, twin.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module.running_var, twin.running_var, rtol=1e-5, atol=1e-5)
        assert torch.equal(module.num_batches_tracked, twin.num_batches_tracked)


@pytest.mark.parametrize("method", ["upgrad", "mean"])
def test_whole_training_step_replays(method):
    """Forward on the replicated batch, one-backward per-task gradients, Gramian aggregation into .grad and an
    optimizer step: captured once, replayed on new batches, equal to the same steps run eagerly."""
    T, N = 3, 4

    def make_model():
        torch.manual_seed(0)
        body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
        model = tk.convert_batchnorm(body, T).to(DEVICE)
        heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(T)).to(DEVICE)
        return model, heads

    def make_step(model, heads, x, y):
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        task_params = [p for p in model.parameters() if all(p is not c.weight for c in convs)] \
            + list(heads.parameters())
        optimizer = torch.optim.Adam([*(c.weight for c in convs), *task_params], lr=1e-2, capturable=True)

        def step():
            optimizer.zero_grad(set_to_none=False)
            with mtl.OneBackward(model, T, modules=convs) as one:
                feats = model(x.repeat(T, 1, 1, 1)).view(T, N, -1)
                losses = torch.stack([nn.functional.mse_loss(heads[t](feats[t]).squeeze(1), y[t])
                                      for t in range(T)])
            mtl.backward_aggregated(losses, method=method, capture=one, task_params=task_params,
                                    check_finite=False)
            optimizer.step()
            return losses.detach()
        return step

    model, heads = make_model()
    twin_model, twin_heads = make_model()
    x = torch.randn(N, 3, 12, 12, device=DEVICE)
    y = torch.randn(T, N, device=DEVICE)
    step = make_step(model, heads, x, y)
    twin_x, twin_y = x.clone(), y.clone()
    twin_step = make_step(twin_model, twin_heads, twin_x, twin_y)
    # Same number of steps on both before comparing: the two warm-up steps of the capture (a capture records
    # without running) and two eager steps.
    graph, losses = capture(step, warmup=2)
    for _ in range(2):
        twin_step()
    for seed in range(3):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        new_x, new_y = torch.randn(x.shape, device=DEVICE, generator=gen), torch.randn(y.shape, device=DEVICE,
                                                                                      generator=gen)
        x.copy_(new_x), y.copy_(new_y), twin_x.copy_(new_x), twin_y.copy_(new_y)
        graph.replay()
        want = twin_step()
        torch.testing.assert_close(losses, want, rtol=1e-4, atol=1e-5)
    for a, b in zip([*model.parameters(), *heads.parameters()], [*twin_model.parameters(), *twin_heads.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
