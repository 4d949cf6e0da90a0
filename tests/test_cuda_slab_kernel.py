"""The CUDA kernel's slab path for planar inputs of the replicated batch (one block per (task, channel) unit, the
unit in shared memory: 2 passes over memory forward, 3 backward) against its split path and the float64
reference. Needs a GPU (skipped elsewhere; tests/test_cuda_kernel_sim.py runs the same kernels in the host
simulator on any machine).

TSBN_CUDA_SLAB forces a path (0: split; 1: slab wherever a unit fits in shared memory) and
``torch.ops.tsbn.ts_bn_cuda_path`` reports the path a call takes, so that no comparison here is vacuous. The two
paths reduce in different orders and are not bitwise equal; each is deterministic.
"""
from __future__ import annotations

import copy
import zlib

import pytest
import torch
from conftest import env_var, make_input, make_params
from test_fused_batch_norm import assert_matches, run

import tsbn_kernels as tk

CUDA = torch.cuda.is_available() and "cuda" in tk.available_backends("cuda")
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a GPU and the CUDA kernels")
DEVICE = "cuda"
ENV = "TSBN_CUDA_SLAB"
LARGE_MEAN_TOL = {"y": 1e-3, "dx": 1e-3, "dweight": 5e-3, "dbias": 1e-3, "running_mean": 1e-3,
                  "running_var": 1e-3}  # as in test_fused_batch_norm.test_large_mean_small_std


def cuda_path(mode: str | None):
    """TSBN_CUDA_SLAB=mode (None: unset, the automatic choice), restored afterwards."""
    return env_var(ENV, mode)


def path_of(x, num_tasks, backward, task_ids=None):
    return torch.ops.tsbn.ts_bn_cuda_path(x, task_ids, num_tasks, backward)


def param_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def run_path(mode, expect, x, weight, bias, stats, **kw):
    """run() of test_fused_batch_norm on the cuda backend, after checking that forward and backward take `expect`."""
    num_tasks = next(t.shape[0] for t in (weight, bias, stats[0]) if t is not None)
    with cuda_path(mode):
        if kw.get("training", True):
            assert path_of(x, num_tasks, False).startswith(expect), path_of(x, num_tasks, False)
        assert path_of(x, num_tasks, True).startswith(expect), path_of(x, num_tasks, True)
        return run("cuda", x, weight, bias, stats, **kw)


def assert_bitwise(a, b):
    for name, p, q in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var"), a, b):
        if p is None or q is None:
            assert p is None and q is None, name
            continue
        assert torch.equal(p, q), f"{name}: two runs differ"


# [N, C, ...] and num_tasks: odd and packed S, N_t = 1 (m = S), 1-D, 2-D and 3-D spatial, the target slabs
# (NYUv2 N_t = 8, S = 1728; CelebA T = 40, S = 256; Cityscapes N_t = 64, S = 512) with few channels.
SHAPES = [((6, 5, 17), 3), ((6, 3, 7, 9), 3), ((3, 4, 36, 48), 3), ((6, 3, 2, 3, 4), 3), ((24, 8, 36, 48), 3),
          ((80, 4, 16, 16), 40), ((128, 2, 16, 32), 2), ((4, 1, 3), 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape,num_tasks", SHAPES, ids=lambda v: str(v))
def test_slab_matches_reference_and_split(dtype, shape, num_tasks):
    g = torch.Generator().manual_seed(zlib.crc32(repr((dtype, shape)).encode()))
    x = make_input(shape, dtype, offset=3.0, generator=g, device=DEVICE)
    weight, bias, rm, rv = make_params(num_tasks, shape[1], param_dtype(dtype), generator=g, device=DEVICE)
    if 2 * x[:shape[0] // num_tasks, 0].numel() * x.element_size() > 200 << 10:
        pytest.skip("the backward unit does not fit in shared memory")
    for gate, activation, b, training in (("sigmoid", None, None, True), ("sigmoid", "relu", bias, True),
                                          ("none", "relu", bias, True), ("none", None, None, True),
                                          ("sigmoid", "relu", bias, False)):
        kw = {"gate": gate, "activation": activation, "training": training}
        want = run("reference64", x, weight, b, (rm, rv), **kw)
        slab = run_path("1", "slab", x, weight, b, (rm, rv), **kw)
        assert_matches(slab, want, dtype, x)
        assert_bitwise(slab, run_path("1", "slab", x, weight, b, (rm, rv), **kw))
        assert_matches(run_path("0", "split", x, weight, b, (rm, rv), **kw), want, dtype, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_slab_large_mean_small_std(dtype):
    """|mean| = 1e4·std: the pivot-shifted two-pass moments over shared memory keep the variance."""
    g = torch.Generator().manual_seed(21)
    x = make_input((6, 4, 36, 48), dtype, offset=1e4, generator=g, device=DEVICE)
    weight, bias, rm, rv = make_params(3, 4, param_dtype(dtype), generator=g, device=DEVICE)
    slab = run_path("1", "slab", x, weight, bias, (rm, rv))
    if dtype != torch.bfloat16:
        want = run("reference64", x, weight, bias, (rm, rv))
        for name, a, b in zip(LARGE_MEAN_TOL, slab, want):
            tol = LARGE_MEAN_TOL[name]
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()),
                                       msg=lambda m: f"{name}: {m}")
    with cuda_path("1"):
        assert path_of(x, 3, False).startswith("slab")
        _, mean, _, var, _ = torch.ops.tsbn.ts_bn_forward(x, weight, None, None, None, None, 3, True, 1e-5, True,
                                                          False)
    xd = x.double().reshape(3, 2, 4, -1).transpose(1, 2).reshape(3, 4, -1)
    torch.testing.assert_close(var.double(), xd.var(-1, unbiased=False), rtol=1e-5, atol=0)
    torch.testing.assert_close(mean.double(), xd.mean(-1), rtol=1e-6, atol=0)


def test_slab_counts_and_stats_outputs():
    g = torch.Generator().manual_seed(3)
    x = make_input((12, 5, 8, 8), torch.float32, offset=1.0, generator=g, device=DEVICE)
    weight = make_params(4, 5, generator=g, device=DEVICE)[0]
    outs = {}
    for mode, expect in (("0", "split"), ("1", "slab")):
        with cuda_path(mode):
            assert path_of(x, 4, False).startswith(expect)
            outs[mode] = torch.ops.tsbn.ts_bn_forward(x, weight, None, None, None, None, 4, True, 1e-5, True, True)
    assert torch.equal(outs["1"][4], torch.full((4,), 3.0 * 64, device=DEVICE))
    for a, b in zip(outs["1"], outs["0"]):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_path_choice():
    """Which path is taken (the tensors are never read: empty is fine)."""
    small = torch.empty(6, 4, 9, 11, device=DEVICE)
    with cuda_path("0"):
        assert path_of(small, 3, False) == "split" and path_of(small, 3, True) == "split"
    with cuda_path("1"):
        assert path_of(small, 3, False).startswith("slab") and path_of(small, 3, True).startswith("slab")
        assert path_of(small, 3, False, task_ids=torch.arange(6, device=DEVICE) % 3) == "split"
        assert path_of(small.contiguous(memory_format=torch.channels_last), 3, False) == "interleaved"
        assert path_of(torch.empty(6, 5, device=DEVICE), 3, False) == "interleaved"
    props = torch.cuda.get_device_properties(DEVICE)
    if (props.major, props.multi_processor_count) != (9, 132):
        return
    # H100 / H200 (132 SMs, 227 KiB per block, 228 KiB per SM).
    with cuda_path(None):
        for c in (512, 1024, 2048):                                   # NYUv2 layers 2-4, T = 3
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.empty(24, c, 36, 48, device=DEVICE, dtype=dtype)
                assert path_of(x, 3, False).startswith("slab") and path_of(x, 3, True).startswith("slab")
        celeba = torch.empty(320, 128, 16, 16, device=DEVICE)         # T = 40
        assert path_of(celeba, 40, False).startswith("slab") and path_of(celeba, 40, True).startswith("slab")
        city = torch.empty(128, 256, 16, 32, device=DEVICE)           # T = 2, 128 KiB of fp32 per unit
        assert path_of(city, 2, False) == "split"                     # one block per SM: not automatic
        assert path_of(city.bfloat16(), 2, False).startswith("slab")
        assert path_of(city, 2, True) == "split"                      # x and dy: 256 KiB, does not fit
        layer1 = torch.empty(24, 256, 72, 96, device=DEVICE)          # NYUv2 layer1, 221 KiB per unit
        assert path_of(layer1, 3, False) == "split" and path_of(layer1, 3, True) == "split"
        assert path_of(torch.empty(24, 32, 36, 48, device=DEVICE), 3, False) == "split"  # 96 units < 2 per SM
    with cuda_path("1"):
        assert path_of(city, 2, False) == "slab:1024x1"
        assert path_of(layer1, 3, False) == "slab:1024x1"
        assert path_of(layer1, 3, True) == "split"


def test_slab_env_is_validated():
    x = make_input((6, 4, 5), offset=1.0, device=DEVICE)
    weight, _, rm, rv = make_params(3, 4, device=DEVICE)
    with cuda_path("yes"), pytest.raises(ValueError, match=ENV):
        tk.ts_batch_norm(x, weight, None, rm.clone(), rv.clone(), backend="cuda")


def test_slab_training_replays_in_a_cuda_graph():
    """Forward and backward on the slab path captured in a CUDA graph and replayed on new inputs."""
    with cuda_path("1"):
        torch.manual_seed(0)
        module = tk.TSBatchNorm2d(24, num_tasks=3, activation="relu").to(DEVICE)
        module.backend = "cuda"
        twin = copy.deepcopy(module)
        x = make_input((6, 24, 16, 16), offset=3.0, device=DEVICE).requires_grad_(True)
        assert path_of(x, 3, False).startswith("slab") and path_of(x, 3, True).startswith("slab")
        grad_y = torch.randn_like(x)

        def step():
            y = module(x)
            dx, dw = torch.autograd.grad(y, (x, module.weight), grad_y)
            return y, dx, dw
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y, dx, dw = step()
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                twin.get_buffer(name).copy_(buffer)
        for seed in range(3):
            fresh = make_input(x.shape, offset=3.0 + seed, device=DEVICE, generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                x.copy_(fresh)
            graph.replay()
            fresh.requires_grad_(True)
            y_want = twin(fresh)
            dx_want, dw_want = torch.autograd.grad(y_want, (fresh, twin.weight), grad_y)
            torch.testing.assert_close(y, y_want, rtol=0, atol=0)
            torch.testing.assert_close(dx, dx_want, rtol=0, atol=0)
            torch.testing.assert_close(dw, dw_want, rtol=0, atol=0)
            torch.testing.assert_close(module.running_mean, twin.running_mean, rtol=0, atol=0)
