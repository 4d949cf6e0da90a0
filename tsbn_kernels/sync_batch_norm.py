"""Task-specific batch norm with statistics synchronised across processes (the SyncBatchNorm of TS layers).

Each rank computes, per (task, channel), the element count, mean and M2 of its own samples; the ranks gather
them with an autograd-aware all_gather and merge them with Chan's formula, so every task is normalised with the
statistics of all its samples on all ranks, and the backward pass carries the cross-rank terms (the gather's
backward sums the gradients that flow into each rank's statistics). Running statistics are updated from the
global statistics and counts. This path is eager PyTorch (any device, gloo or nccl); the fused kernels are used
when there is a single process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor

from .reference import accumulation_dtype, gate_values, task_index


def _task_moments(x: Tensor, ids: Tensor, num_tasks: int) -> tuple[Tensor, Tensor, Tensor]:
    """Local (count [T], mean [T, C], M2 [T, C]) over samples and spatial positions, two-pass."""
    acc = x.dtype
    spatial = x[0, 0].numel() if x.shape[0] else 1
    count = torch.bincount(ids, minlength=num_tasks).to(acc) * spatial
    reduce = list(range(2, x.dim()))
    per_sample = x.sum(dim=reduce) if reduce else x
    total = torch.zeros(num_tasks, x.shape[1], dtype=acc, device=x.device).index_add(0, ids, per_sample)
    mean = total / count.clamp_min(1).unsqueeze(1)
    centered = x - mean.index_select(0, ids).reshape(x.shape[0], x.shape[1], *([1] * len(reduce)))
    sq = centered * centered
    m2 = torch.zeros_like(total).index_add(0, ids, sq.sum(dim=reduce) if reduce else sq)
    return count, mean, m2


def sync_ts_batch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                       running_var: Tensor | None, *, task_ids: Tensor | None, num_tasks: int,
                       momentum: float | None, eps: float, gate: str, activation: str | None,
                       num_batches_tracked: Tensor | None = None, process_group=None) -> Tensor:
    """Training-mode TSσBN over the union of every rank's batch (inputs validated by the caller). A task counts
    as present, for num_batches_tracked and the running statistics, when any rank has samples of it."""
    acc = accumulation_dtype(x.dtype)
    xa = x.to(acc)
    ids = task_index(task_ids, x.shape[0], num_tasks, x.device)
    count, mean, m2 = _task_moments(xa, ids, num_tasks)
    group = process_group or dist.group.WORLD
    counts = torch.stack(dist_fn.all_gather(count.detach(), group=group))       # [R, T]
    means = torch.stack(dist_fn.all_gather(mean, group=group))                  # [R, T, C]
    m2s = torch.stack(dist_fn.all_gather(m2, group=group))
    total = counts.sum(dim=0)                                                    # [T]
    weights = (counts / total.clamp_min(1)).unsqueeze(2)                         # [R, T, 1]
    global_mean = (weights * means).sum(dim=0)
    deviation = means - global_mean.unsqueeze(0)
    global_m2 = (m2s + counts.unsqueeze(2) * deviation * deviation).sum(dim=0)   # Chan's merge of all ranks
    var = global_m2 / total.clamp_min(1).unsqueeze(1)
    if running_mean is not None:
        with torch.no_grad():
            present = (total > 0).unsqueeze(1)
            if num_batches_tracked is not None:
                num_batches_tracked.add_(present.squeeze(1).long())
            if momentum is None:
                factor = (1.0 / num_batches_tracked.clamp_min(1).to(acc)).unsqueeze(1)
            else:
                factor = torch.full_like(var[:, :1], float(momentum))
            factor = torch.where(present, factor, torch.zeros_like(factor))
            unbiased = var * (total / (total - 1).clamp_min(1)).unsqueeze(1)
            running_mean.copy_(torch.lerp(running_mean.to(acc), global_mean.detach(), factor))
            running_var.copy_(torch.lerp(running_var.to(acc), unbiased.detach(), factor))
    shape = (x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))
    scale = torch.rsqrt(var + eps)
    a = gate_values(None if weight is None else weight.to(acc), gate)
    if a is not None:
        scale = scale * a
    y = (xa - global_mean.index_select(0, ids).reshape(shape)) * scale.index_select(0, ids).reshape(shape)
    if bias is not None:
        y = y + bias.to(acc).index_select(0, ids).reshape(shape)
    if activation == "relu":
        y = torch.relu(y)
    return y.to(x.dtype)


def convert_sync(module: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """Switch every TS batch-norm layer of ``module`` to cross-process statistics (in place; returns it)."""
    from .modules import _TSBatchNorm

    for m in module.modules():
        if isinstance(m, _TSBatchNorm):
            m.sync = True
            m.process_group = process_group
    return module
