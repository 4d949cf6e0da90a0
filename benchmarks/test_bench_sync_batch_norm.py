"""ts_batch_norm with statistics over every process (sync mode, DDP): forward+backward per backend.

Contenders, side by side: each backend's fused sync path ("<backend>"), the eager sync path ("eager_sync",
PyTorch ops with autograd through the gather) and backend="auto" without sync ("unsynced", the floor: the ideal
two-pass forward and three-pass backward where a slab path applies). The process group has one
process (gloo on the CPU, nccl on the GPU), so the collectives cost their call overhead only; what is measured is
the passes over memory of each path. The fused sync path makes the split design's passes (forward: statistics,
apply; backward: gradient sums, dx — 8·M·s), the bytes reported are the ideal model's 5·M·s of the ts_batch_norm
group, so the two groups' GB/s compare directly.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import tsbn_kernels as tk
from benchmarks.conftest import DEVICE
from benchmarks.shapes import SMOKE, batch_norm_cases
from benchmarks.test_bench_batch_norm import _inputs
from tsbn_kernels import dispatch

FUSED = [b for b in tk.available_backends(DEVICE, "ts_batch_norm_sync") if b != "eager"]
CONTENDERS = FUSED + ["eager_sync", "unsynced"]


def cases():
    for case in batch_norm_cases(DEVICE):
        # The 2-core CPU run keeps to NYUv2 layer1 (the sync path's passes are those of the split design).
        if DEVICE == "cpu" and not SMOKE and case.name != "nyuv2-layer1":
            continue
        for channels_last in (False, True):
            yield pytest.param(case, channels_last, id=f"{case.id}-float32-{'cl' if channels_last else 'nchw'}")


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    init = tmp_path_factory.mktemp("sync") / "init"
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", init_method=f"file://{init}", rank=0,
                            world_size=1, **({"device_id": torch.device("cuda", 0)} if DEVICE == "cuda" else {}))
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("case,channels_last", list(cases()))
def test_sync_ts_batch_norm(benchmark, measure, group, case, channels_last, contender):
    x, grad, weight = _inputs(case.shape, case.num_tasks, torch.float32, channels_last)
    c = x.shape[1]
    rm, rv = torch.zeros(case.num_tasks, c, device=DEVICE), torch.ones(case.num_tasks, c, device=DEVICE)
    if contender == "unsynced":
        def fn(x):
            return tk.ts_batch_norm(x, weight, None, rm, rv, training=True)
    else:
        _, sync = dispatch.resolve("eager" if contender == "eager_sync" else contender, torch.device(DEVICE),
                                   "ts_batch_norm_sync")

        def fn(x):
            return sync(x, weight, None, rm, rv, task_ids=None, num_tasks=case.num_tasks, momentum=0.1, eps=1e-5,
                        gate="sigmoid", activation=None, process_group=group)

    x = x.detach().requires_grad_(True)

    def step():
        (grad_x,) = torch.autograd.grad(fn(x), x, grad)
        return grad_x

    layout = "channels_last" if channels_last else "nchw"
    # No CUDA graph: collectives stay out of captures here.
    measure(benchmark, step, bytes_moved=5 * x.numel() * x.element_size(), graph=False,
            group=f"ts_batch_norm_sync/forward_backward/{case.id}/float32/{layout}", contender=contender,
            ours=contender in FUSED, shape=list(case.shape), num_tasks=case.num_tasks)
