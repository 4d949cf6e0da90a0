"""Task-specific batch norm with statistics synchronised across processes (the SyncBatchNorm of TS layers).

Each rank computes, per (task, channel), the element count, mean and M2 of its own samples; the ranks gather
them in one all_gather and merge them with Chan's formula, so every task is normalised with the statistics of
all its samples on all ranks. In the backward pass the ranks sum, per (task, channel), Σ dy' and Σ dy'·(x − mean)
(dy' is dy through the relu), which carries the cross-rank terms: rank r's dx sees every rank's loss through the
shared statistics. Running statistics are updated from the global statistics and counts.

Two implementations behind the dispatch op "ts_batch_norm_sync":
* eager (any device, the ground truth): PyTorch ops, with autograd through an autograd-aware all_gather;
* fused (a backend that registers :class:`SyncKernels`): its kernels do the four passes over memory — local
  statistics, apply, gradient sums, dx — with the collectives on [T, C] tables in between, the bytes of the split
  design of DESIGN.md §4 (forward: 2 reads, 1 write; backward: 4 reads, 1 write).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .reference import accumulation_dtype, affine_grads_from_sums, gate_values, task_index


class _AllGather(torch.autograd.Function):
    """Stack of every rank's tensor, [R, *shape]. The backward sums, over ranks, the gradient each rank's loss
    sends to this rank's slice: an all_reduce then a slice, which gloo supports (it has no reduce_scatter).
    Written on the plain c10d collectives because torch.distributed.nn.functional is deprecated."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        return _all_gather(tensor, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        _refuse_double_backward(grad)
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


def _refuse_double_backward(*tensors: Tensor | None) -> None:
    # The collectives of a backward are not recorded by autograd: a second derivative through them
    # (create_graph=True) would silently lose the cross-process terms.
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError("sync-mode task-specific batch norm does not support higher-order gradients "
                           "(backward with create_graph=True): its cross-process terms are not differentiable. "
                           "Run that computation without sync (convert_sync off, or a single process)")


def _all_gather(tensor: Tensor, group) -> Tensor:
    tensor = tensor.contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, tensor, group=group)
    return torch.stack(gathered)


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


def _merge_ranks(packed: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor]:
    """(count [T], mean [T, C], biased var [T, C]) of all ranks from their stacked [R, T, 1 + 2C] rows of (count,
    mean, M2): Chan's merge. Differentiable, for the eager path's autograd through the gather."""
    counts, means, m2s = packed[:, :, 0], packed[:, :, 1:1 + channels], packed[:, :, 1 + channels:]
    total = counts.sum(dim=0)
    weights = (counts / total.clamp_min(1)).unsqueeze(2)
    mean = (weights * means).sum(dim=0)
    deviation = means - mean.unsqueeze(0)
    m2 = (m2s + counts.unsqueeze(2) * deviation * deviation).sum(dim=0)
    return total, mean, m2 / total.clamp_min(1).unsqueeze(1)


@torch.no_grad()
def _update_running(running_mean: Tensor | None, running_var: Tensor | None, num_batches_tracked: Tensor | None,
                    total: Tensor, mean: Tensor, var: Tensor, momentum: float | None) -> None:
    """The running statistics from the global ones; a task counts as present when any rank has samples of it."""
    if running_mean is None:
        return
    present = (total > 0).unsqueeze(1)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(present.squeeze(1).long())
    acc = mean.dtype
    if momentum is None:
        factor = (1.0 / num_batches_tracked.clamp_min(1).to(acc)).unsqueeze(1)
    else:
        factor = torch.full_like(var[:, :1], float(momentum))
    factor = torch.where(present, factor, torch.zeros_like(factor))
    unbiased = var * (total / (total - 1).clamp_min(1)).unsqueeze(1)
    running_mean.copy_(torch.lerp(running_mean.to(acc), mean.detach(), factor))
    running_var.copy_(torch.lerp(running_var.to(acc), unbiased.detach(), factor))


def sync_ts_batch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                       running_var: Tensor | None, *, task_ids: Tensor | None, num_tasks: int,
                       momentum: float | None, eps: float, gate: str, activation: str | None,
                       num_batches_tracked: Tensor | None = None, process_group=None) -> Tensor:
    """Training-mode TSσBN over the union of every rank's batch, in eager PyTorch (inputs validated by the
    caller): the ground truth of the fused sync path."""
    acc = accumulation_dtype(x.dtype)
    xa = x.to(acc)
    ids = task_index(task_ids, x.shape[0], num_tasks, x.device)
    count, mean, m2 = _task_moments(xa, ids, num_tasks)
    group = process_group or dist.group.WORLD
    # One collective for all three: its latency, not its bytes, is what a per-layer sync costs.
    packed = _AllGather.apply(torch.cat([count.detach().unsqueeze(1), mean, m2], dim=1), group)  # [R, T, 1+2C]
    total, global_mean, var = _merge_ranks(packed, x.shape[1])
    _update_running(running_mean, running_var, num_batches_tracked, total, global_mean, var, momentum)
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


@dataclass(frozen=True)
class SyncKernels:
    """The passes over memory of a fused backend's sync path; between them run collectives on [T, C] tables.
    Statistics are in the accumulation dtype (fp32; fp64 for fp64 input); dy' is dy masked by the relu, which is
    recomputed from x, mean, invstd and the affine; a is sigmoid(weight), weight, or 1 without weight.

    stats(x, task_ids, num_tasks) -> (mean [T, C], biased var [T, C], element count [T]) of this rank's samples
        (an absent task: 0, 0, 0);
    apply(x, weight, bias, mean, var, task_ids, num_tasks, eps, sigmoid_gate, relu) -> y, normalised with the
        given statistics (invstd = rsqrt(var + eps));
    reduce(grad_y, x, weight, bias, mean, invstd, task_ids, num_tasks, sigmoid_gate, relu)
        -> (sum_dy = Σ dy', sum_dy_xmu = Σ dy'·(x − mean)) [T, C] over this rank's samples, in the accumulation
        dtype or wider;
    elemt(grad_y, x, weight, bias, mean, invstd, sum_dy, sum_dy_xmu, count, task_ids, num_tasks, sigmoid_gate,
          relu) -> grad_x = a·invstd·(dy' − sum_dy/m − (x − mean)·invstd²·sum_dy_xmu/m), m = count[t], with the
        sums and counts of all ranks.
    """
    stats: Callable
    apply: Callable
    reduce: Callable
    elemt: Callable


_sync_kernels: dict[str, SyncKernels] = {}


def register_sync_kernels(backend: str, kernels: SyncKernels, device_types: tuple[str, ...]) -> None:
    """Make ``kernels`` the sync path of ``backend`` on the given device types."""
    from . import dispatch

    _sync_kernels[backend] = kernels
    dispatch.register(backend, "ts_batch_norm_sync", functools.partial(fused_sync_ts_batch_norm, kernels),
                      device_types)


def sync_kernels(backend: str) -> SyncKernels:
    """The registered :class:`SyncKernels` of ``backend`` (for tests and benchmarks)."""
    from . import dispatch

    dispatch.available_backends()      # imports the kernel modules, which register theirs
    if backend not in _sync_kernels:
        raise ValueError(f"backend {backend!r} has no fused sync kernels; those that have: {sorted(_sync_kernels)}")
    return _sync_kernels[backend]


class _FusedSyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, kernels, task_ids, num_tasks, eps, sigmoid_gate, relu, group, running_mean,
                running_var, num_batches_tracked, momentum):
        channels = x.shape[1]
        if x.numel():
            mean, var, count = kernels.stats(x, task_ids, num_tasks)
        else:   # a rank without samples still takes part in the collectives
            acc = accumulation_dtype(x.dtype)
            mean = var = x.new_zeros((num_tasks, channels), dtype=acc)
            count = x.new_zeros((num_tasks,), dtype=acc)
        acc = mean.dtype
        # The merge in float64: a few [R, T, C] ops, and the M2s of tasks with |mean| >> std keep their digits.
        local = torch.cat([count.unsqueeze(1), mean, var * count.unsqueeze(1)], dim=1).to(torch.float64)
        total, mean, var = _merge_ranks(_all_gather(local, group), channels)
        mean, var, total = mean.to(acc), var.to(acc), total.to(acc)
        _update_running(running_mean, running_var, num_batches_tracked, total, mean, var, momentum)
        y = kernels.apply(x, weight, bias, mean, var, task_ids, num_tasks, eps, sigmoid_gate, relu) if x.numel() \
            else torch.empty_like(x)
        ctx.save_for_backward(x, weight, bias, mean, torch.rsqrt(var + eps), total, task_ids)
        ctx.config = (kernels, num_tasks, sigmoid_gate, relu, group)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, mean, invstd, total, task_ids = ctx.saved_tensors
        _refuse_double_backward(grad_y, x, weight, bias)
        kernels, num_tasks, sigmoid_gate, relu, group = ctx.config
        if x.numel():
            sum_dy, sum_dy_xmu = kernels.reduce(grad_y, x, weight, bias, mean, invstd, task_ids, num_tasks,
                                                sigmoid_gate, relu)
        else:
            sum_dy = sum_dy_xmu = torch.zeros_like(mean)
        # The parameter gradients are this rank's (DDP all-reduces them); dx needs the sums of every rank.
        grad_weight, grad_bias = affine_grads_from_sums(sum_dy, sum_dy_xmu, invstd,
                                                        weight if ctx.needs_input_grad[1] else None,
                                                        bias if ctx.needs_input_grad[2] else None, sigmoid_gate)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # float64 whatever each rank's kernels returned: every rank must send the same bytes.
            sums = torch.cat([sum_dy, sum_dy_xmu], dim=1).to(torch.float64)
            dist.all_reduce(sums, group=group)
            sum_dy, sum_dy_xmu = sums.split(x.shape[1], dim=1)
            grad_x = kernels.elemt(grad_y, x, weight, bias, mean, invstd, sum_dy.contiguous(),
                                   sum_dy_xmu.contiguous(), total, task_ids, num_tasks, sigmoid_gate, relu) \
                if x.numel() else torch.zeros_like(x)
        return (grad_x, grad_weight, grad_bias) + (None,) * 11


def fused_sync_ts_batch_norm(kernels: SyncKernels, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                             running_mean: Tensor | None, running_var: Tensor | None, *, task_ids: Tensor | None,
                             num_tasks: int, momentum: float | None, eps: float, gate: str, activation: str | None,
                             num_batches_tracked: Tensor | None = None, process_group=None) -> Tensor:
    """The contract of :func:`sync_ts_batch_norm` on a backend's :class:`SyncKernels`."""
    group = process_group or dist.group.WORLD
    return _FusedSyncBatchNorm.apply(x, weight, bias, kernels, task_ids, num_tasks, float(eps), gate == "sigmoid",
                                     activation == "relu", group, running_mean, running_var, num_batches_tracked,
                                     momentum)


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
        from . import dispatch

        _, sync_ts_batch_norm = dispatch.resolve("auto", x.device, "ts_batch_norm_sync")
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
