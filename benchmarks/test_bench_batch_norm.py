"""ts_batch_norm: training forward, forward+backward and eval, every backend against the baselines.

Per group (pass × shape × dtype × layout), side by side in one run: each available backend of ours, the
eager reference ("eager"), a loop of T F.batch_norm calls ("loop_F.batch_norm", the timm SplitBatchNorm
style), one plain nn.BatchNorm2d over the same tensor ("plain_batch_norm", the cost floor), and on the GPU
torch.compile of the reference ("compiled_reference"). Where the CUDA backend is built, "cuda_split" is that
backend forced onto its split design (TSBN_CUDA_SLAB=0) for NCHW training passes, next to "cuda" (the automatic
choice: the slab path where a (task, channel) unit fits in shared memory). Bytes follow DESIGN.md §4's ideal model:
forward 2·M·s, backward 3·M·s (forward+backward 5·M·s), eval 2·M·s.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import tsbn_kernels as tk
from benchmarks.conftest import DEVICE
from benchmarks.shapes import SMOKE, batch_norm_cases
from tsbn_kernels import reference

PASSES = {"forward": 2, "forward_backward": 5, "eval": 2}
OURS = [b for b in tk.available_backends(DEVICE) if b != "eager"]
# The CUDA backend on its split design, to compare with its automatic choice of the slab path.
VARIANTS = ["cuda_split"] if "cuda" in OURS else []
BASELINES = ["eager", "loop_F.batch_norm", "plain_batch_norm"] + (["compiled_reference"] if DEVICE == "cuda" else [])
DTYPES = [torch.float32, torch.bfloat16]


def variants():
    for case in batch_norm_cases(DEVICE):
        for dtype in DTYPES:
            for channels_last in (False, True):
                # The 2-core CPU run keeps bf16 and channels_last to the first layer of each benchmark.
                if DEVICE == "cpu" and not SMOKE and (dtype != torch.float32 or channels_last) \
                        and not case.name.endswith("layer1"):
                    continue
                yield pytest.param(case, dtype, channels_last,
                                   id=f"{case.id}-{str(dtype)[6:]}-{'cl' if channels_last else 'nchw'}")


def _inputs(shape, num_tasks, dtype, channels_last, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device=DEVICE, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype)
    grad = grad.contiguous(memory_format=torch.channels_last) if channels_last else grad
    weight = torch.randn(num_tasks, shape[1], generator=g).to(DEVICE)
    return x, grad, weight


_cached_inputs = functools.lru_cache(maxsize=1)(_inputs)


def candidate(name: str, x, weight, num_tasks: int, training: bool):
    """A callable computing y from x for one contender; running statistics live in its closure."""
    c = x.shape[1]
    rm, rv = torch.zeros(num_tasks, c, device=DEVICE), torch.ones(num_tasks, c, device=DEVICE)
    if name in OURS or name == "eager":
        return lambda x: tk.ts_batch_norm(x, weight, None, rm, rv, training=training, backend=name)
    if name == "compiled_reference":
        compiled = torch.compile(reference.ts_batch_norm)
        return lambda x: compiled(x, weight, None, rm, rv, training=training, num_tasks=num_tasks)
    if name == "loop_F.batch_norm":
        def loop(x):
            n = x.shape[0] // num_tasks
            gate = weight.sigmoid()
            return torch.cat([F.batch_norm(x[t * n:(t + 1) * n], rm[t], rv[t], gate[t], None, training)
                              for t in range(num_tasks)])
        return loop
    if name == "plain_batch_norm":
        plain_w, plain_rm, plain_rv = weight[0].sigmoid(), rm[0].clone(), rv[0].clone()
        return lambda x: F.batch_norm(x, plain_rm, plain_rv, plain_w, None, training)
    raise ValueError(name)


@pytest.mark.parametrize("contender", OURS + VARIANTS + BASELINES)
@pytest.mark.parametrize("pass_", list(PASSES))
@pytest.mark.parametrize("case,dtype,channels_last", list(variants()))
def test_ts_batch_norm(benchmark, measure, monkeypatch, case, dtype, channels_last, pass_, contender):
    if contender == "cuda_split":
        if channels_last or pass_ == "eval":
            pytest.skip("the slab path is for NCHW training passes only")
        monkeypatch.setenv("TSBN_CUDA_SLAB", "0")   # read on every call, forward and backward
        contender_backend = "cuda"
    else:
        contender_backend = contender
    x, grad, weight = _cached_inputs(case.shape, case.num_tasks, dtype, channels_last)
    fn = candidate(contender_backend, x, weight, case.num_tasks, training=pass_ != "eval")

    def make_step(x, grad):
        if pass_ == "forward_backward":
            x = x.detach().requires_grad_(True)

            def step():
                (grad_x,) = torch.autograd.grad(fn(x), x, grad)
                return grad_x
        else:
            def step():
                with torch.no_grad():
                    return fn(x)
        return step

    seeds = iter(range(1, 1 << 16))
    layout = "channels_last" if channels_last else "nchw"
    measure(benchmark, make_step(x, grad), bytes_moved=PASSES[pass_] * x.numel() * x.element_size(),
            rotate=lambda: make_step(*_inputs(case.shape, case.num_tasks, dtype, channels_last, next(seeds))[:2]),
            group=f"ts_batch_norm/{pass_}/{case.id}/{str(dtype)[6:]}/{layout}", contender=contender,
            ours=contender in OURS + VARIANTS, shape=list(case.shape), num_tasks=case.num_tasks)
