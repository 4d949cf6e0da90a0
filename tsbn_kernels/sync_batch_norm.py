"""Task-specific batch norm with statistics synchronised across processes (the SyncBatchNorm of TS layers).

Each rank computes, per (task, channel), the element count, mean and M2 of its own samples; the ranks gather
them in one autograd-aware all_gather and merge them with Chan's formula, so every task is normalised with the
statistics of all its samples on all ranks, and the backward pass carries the cross-rank terms (the gather's
backward sums the gradients that flow into each rank's statistics). Running statistics are updated from the
global statistics and counts. This path is eager PyTorch (any device, gloo or nccl); the fused kernels are used
when there is a single process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .reference import accumulation_dtype, gate_values, task_index


class _AllGather(torch.autograd.Function):
    """Stack of every rank's tensor, [R, *shape]. The backward sums, over ranks, the gradient each rank's loss
    sends to this rank's slice: an all_reduce then a slice, which gloo supports (it has no reduce_scatter).
    Written on the plain c10d collectives because torch.distributed.nn.functional is deprecated."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        tensor = tensor.contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, tensor, group=group)
        return torch.stack(gathered)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


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
    channels = x.shape[1]
    # One collective for all three: its latency, not its bytes, is what a per-layer sync costs.
    packed = _AllGather.apply(torch.cat([count.detach().unsqueeze(1), mean, m2], dim=1), group)  # [R, T, 1+2C]
    counts, means, m2s = packed[:, :, 0], packed[:, :, 1:1 + channels], packed[:, :, 1 + channels:]
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


class DistributedBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """A plain BatchNorm{1,2,3}d whose training statistics span every process, on any device and backend
    (``nn.SyncBatchNorm`` refuses CPU tensors, so gloo runs cannot use it). Same parameters, buffers and
    state_dict as the BatchNorm it replaces; one process, or eval mode, is exactly ``F.batch_norm``. It is the
    one-task case of the task-specific sync path."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"DistributedBatchNorm expects [N, C, ...] input, got shape {tuple(input.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        group = self.process_group or dist.group.WORLD
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(group) > 1):
            return super().forward(x)
        track = self.track_running_stats and self.running_mean is not None
        row = (lambda t: None if t is None else t.view(1, *t.shape))
        return sync_ts_batch_norm(
            x, row(self.weight), row(self.bias), row(self.running_mean) if track else None,
            row(self.running_var) if track else None, task_ids=None, num_tasks=1, momentum=self.momentum,
            eps=self.eps, gate="none", activation=None,
            num_batches_tracked=self.num_batches_tracked.view(1) if track else None, process_group=group)


def convert_sync(module: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """Make every normalisation of ``module`` use the statistics of all processes (in place; returns the module,
    or its replacement when ``module`` itself is a BatchNorm): TS batch-norm layers switch to sync mode, plain
    BatchNorm{1,2,3}d become DistributedBatchNorm (same state). LayerNorms need nothing: their statistics are
    per sample."""
    from .modules import _TSBatchNorm

    if isinstance(module, _TSBatchNorm):
        module.sync, module.process_group = True, process_group
        return module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, DistributedBatchNorm):
        reference = module.weight if module.weight is not None else module.running_mean
        factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
        replacement = DistributedBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                           module.track_running_stats, process_group=process_group, **factory)
        replacement.load_state_dict(module.state_dict())
        if module.affine:
            replacement.weight.requires_grad_(module.weight.requires_grad)
            replacement.bias.requires_grad_(module.bias.requires_grad)
        replacement.train(module.training)
        return replacement
    for name, child in module.named_children():
        converted = convert_sync(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module
