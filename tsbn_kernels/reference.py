"""Eager PyTorch ground truth for every op of the package.

Every fused backend (C++ CPU, CUDA, Triton) is tested against the functions in this file, so they favour
clarity and exactness over speed: statistics are computed in two passes (mean, then the mean of squared
deviations), in float32 for half-precision inputs and in float64 for float64 inputs.

Inputs are assumed valid here; ``tsbn_kernels.validation`` checks them before any backend runs.

Task layout: ``task_ids=None`` means the replicated batch (task-major blocks of N / T rows, DESIGN.md §1);
otherwise ``task_ids`` is an int64 tensor with one task index per sample (ragged and empty tasks allowed).
``momentum`` is a float, or a float64 tensor of shape [T] holding one running-average factor per task
(the cumulative average of ``momentum=None`` is passed that way by ``tsbn_kernels.functional``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "gate_values", "samples_per_task", "task_index", "ts_batch_norm",
           "ts_batch_norm_with_statistics", "ts_layer_norm"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16/fp32 accumulate in fp32; fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gate_values(weight: Tensor | None, gate: str) -> Tensor | None:
    """The per-(task, channel) scale a: sigmoid(weight) for the σ gate, the weight itself otherwise."""
    if weight is None:
        return None
    return torch.sigmoid(weight) if gate == "sigmoid" else weight


def affine_grads_from_sums(sum_dy: Tensor, sum_dy_xmu: Tensor, invstd: Tensor, weight: Tensor | None,
                           bias: Tensor | None, sigmoid_gate: bool) -> tuple[Tensor | None, Tensor | None]:
    """(grad_weight, grad_bias) of ts_batch_norm from the per-(task, channel) sums Σ dy' and Σ dy'·(x − mean) of the
    fused backward passes (dy' is dy through the relu); None for an absent parameter. Computed in the sums' dtype."""
    grad_weight = grad_bias = None
    if weight is not None:
        grad_weight = invstd.to(sum_dy_xmu.dtype) * sum_dy_xmu        # Σ dy'·x̂: the gradient of the scale a
        if sigmoid_gate:
            gate = torch.sigmoid(weight.to(grad_weight.dtype))
            grad_weight = grad_weight * gate * (1 - gate)
        grad_weight = grad_weight.to(weight.dtype)
    if bias is not None:
        grad_bias = sum_dy.to(bias.dtype)
    return grad_weight, grad_bias


def task_index(task_ids: Tensor | None, batch: int, num_tasks: int, device: torch.device) -> Tensor:
    """One task index per sample; the replicated batch is task-major: rows [t·N, (t+1)·N) are task t."""
    if task_ids is not None:
        return task_ids.long()
    return torch.arange(batch, device=device) // (batch // num_tasks)


def samples_per_task(ids: Tensor, num_tasks: int) -> Tensor:
    """int64 [T]: how many samples each task has, counted on ids' device (no host sync; index_add rather than
    bincount, which has no meta kernel and a data-dependent output size under torch.compile)."""
    return torch.zeros(num_tasks, dtype=torch.int64, device=ids.device).index_add(0, ids, torch.ones_like(ids))


def _per_sample(table: Tensor, ids: Tensor, ndim: int) -> Tensor:
    """Gather a [T, C] table to [N, C, 1, ..., 1] so it broadcasts against an [N, C, *spatial] input."""
    return table.index_select(0, ids).reshape(ids.shape[0], table.shape[1], *([1] * (ndim - 2)))


def _task_channel_sum(values: Tensor, ids: Tensor, num_tasks: int) -> Tensor:
    """Σ over the samples of each task and the spatial positions: [N, C, *spatial] -> [T, C]."""
    per_sample = values.sum(dim=list(range(2, values.dim()))) if values.dim() > 2 else values
    out = torch.zeros(num_tasks, values.shape[1], dtype=values.dtype, device=values.device)
    return out.index_add(0, ids, per_sample)


def ts_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    task_ids: Tensor | None = None,
    num_tasks: int | None = None,
    training: bool = True,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    gate: str = "sigmoid",
    activation: str | None = None,
) -> Tensor:
    """Task-specific (sigmoid) batch norm, DESIGN.md §1.

    x: [N, C, *spatial]; weight, bias, running_mean, running_var: [T, C]. Returns y with x's dtype and
    memory format. In training mode the running statistics of every task present in the batch are updated
    in place (biased variance for normalisation, unbiased variance for the running estimate).
    """
    if num_tasks is None:
        num_tasks = next(t.shape[0] for t in (weight, bias, running_mean) if t is not None)
    acc = accumulation_dtype(x.dtype)
    batch = x.shape[0]
    spatial = math.prod(x.shape[2:])
    ids = task_index(task_ids, batch, num_tasks, x.device)
    xa = x.to(acc)

    if training:
        counts = samples_per_task(ids, num_tasks).to(acc) * spatial  # m_t, elements per channel
        denom = counts.clamp_min(1).unsqueeze(1)
        # Two passes (mean, then squared deviations): exact for |mean| >> std, unlike E[x²] − E[x]².
        mean = _task_channel_sum(xa, ids, num_tasks) / denom
        centered = xa - _per_sample(mean, ids, x.dim())
        var = _task_channel_sum(centered * centered, ids, num_tasks) / denom
        if running_mean is not None:
            _update_running_stats(running_mean, running_var, mean, var, counts, momentum)
    else:
        mean = running_mean.to(acc)
        var = running_var.to(acc)
        centered = xa - _per_sample(mean, ids, x.dim())

    return _scale_and_shift(centered, ids, torch.rsqrt(var + eps), weight, bias, gate, activation).to(x.dtype)


def ts_batch_norm_with_statistics(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    *,
    task_ids: Tensor | None = None,
    num_tasks: int,
    gate: str = "sigmoid",
    activation: str | None = None,
) -> Tensor:
    """y of ``ts_batch_norm`` for given per-(task, channel) statistics ``mean`` and ``invstd`` = 1/sqrt(var + eps)
    [T, C]: the eval-mode formula, also the training-mode one with the batch statistics held fixed."""
    acc = accumulation_dtype(x.dtype)
    ids = task_index(task_ids, x.shape[0], num_tasks, x.device)
    centered = x.to(acc) - _per_sample(mean.to(acc), ids, x.dim())
    return _scale_and_shift(centered, ids, invstd.to(acc), weight, bias, gate, activation).to(x.dtype)


def _scale_and_shift(centered: Tensor, ids: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None,
                     gate: str, activation: str | None) -> Tensor:
    """act(a·(x − μ)·r + b) in the accumulation dtype, the per-(task, channel) tables gathered per sample."""
    scale = invstd
    a = gate_values(None if weight is None else weight.to(invstd.dtype), gate)
    if a is not None:
        scale = scale * a
    y = centered * _per_sample(scale, ids, centered.dim())
    if bias is not None:
        y = y + _per_sample(bias.to(invstd.dtype), ids, centered.dim())
    if activation == "relu":
        y = torch.relu(y)
    return y


@torch.no_grad()
def _update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                          counts: Tensor, momentum: float | Tensor) -> None:
    mean, var = mean.detach(), var.detach()   # no_grad does not stop forward-mode AD from giving the buffers tangents
    present = (counts > 0).unsqueeze(1)
    unbiased = var * (counts / (counts - 1).clamp_min(1)).unsqueeze(1)
    if isinstance(momentum, Tensor):
        factor = momentum.to(mean.dtype).unsqueeze(1)
    else:
        factor = torch.full_like(present, float(momentum), dtype=mean.dtype)
    factor = torch.where(present, factor, torch.zeros_like(factor))
    new_mean = running_mean.to(mean.dtype) * (1 - factor) + mean * factor
    new_var = running_var.to(mean.dtype) * (1 - factor) + unbiased * factor
    running_mean.copy_(torch.where(present, new_mean, running_mean.to(mean.dtype)))
    running_var.copy_(torch.where(present, new_var, running_var.to(mean.dtype)))


def ts_layer_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None = None,
    *,
    task_ids: Tensor | None = None,
    num_tasks: int | None = None,
    eps: float = 1e-5,
    gate: str = "sigmoid",
) -> Tensor:
    """Task-specific (sigmoid) layer norm, the transformer form of TSσBN.

    x: [B, ..., *normalized_shape], sample b belonging to task task_ids[b] (task-major blocks when None);
    weight, bias: [T, *normalized_shape]. Statistics are per token over normalized_shape, exactly as
    F.layer_norm; only the gate and bias are chosen by the sample's task.
    """
    if num_tasks is None:
        num_tasks = next(t.shape[0] for t in (weight, bias) if t is not None)
    params = weight if weight is not None else bias
    norm_ndim = params.dim() - 1 if params is not None else 1
    acc = accumulation_dtype(x.dtype)
    xa = x.to(acc)
    dims = list(range(x.dim() - norm_ndim, x.dim()))
    mean = xa.mean(dim=dims, keepdim=True)
    centered = xa - mean
    var = (centered * centered).mean(dim=dims, keepdim=True)
    y = centered * torch.rsqrt(var + eps)
    ids = task_index(task_ids, x.shape[0], num_tasks, x.device)
    # [B, 1, ..., 1, *normalized_shape]: the task's row broadcast over the token dimensions.
    expand = (x.shape[0],) + (1,) * (x.dim() - 1 - norm_ndim) + tuple(x.shape[x.dim() - norm_ndim:])
    a = gate_values(None if weight is None else weight.to(acc), gate)
    if a is not None:
        y = y * a.index_select(0, ids).reshape(expand)
    if bias is not None:
        y = y + bias.to(acc).index_select(0, ids).reshape(expand)
    return y.to(x.dtype)
