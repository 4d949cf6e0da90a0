"""Backends "cpu" and "cuda": the compiled ``tsbn::ts_bn_*`` ops (csrc/) with their fake impls and autograd.

``tsbn::ts_bn_forward`` is functional, so autograd is registered on it directly; the running statistics are
updated by the separate in-place op ``tsbn::ts_bn_update_running_stats`` (autograd formulas cannot be
registered on mutating ops), which the training path calls right after the forward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension, dispatch
from . import double_backward
from ..reference import accumulation_dtype
from ..sync_batch_norm import SyncKernels, register_sync_kernels

if not _extension.has_op("ts_bn_forward"):
    raise ImportError(f"tsbn_kernels._C with ts_bn_forward is not built: {_extension.LOAD_ERROR}")

_ops = torch.ops.tsbn


@torch.library.register_fake("tsbn::ts_bn_forward")
def _forward_fake(x, weight, bias, running_mean, running_var, task_ids, num_tasks, training, eps, sigmoid_gate,
                  relu):
    acc = accumulation_dtype(x.dtype)
    stats = x.new_empty((num_tasks, x.shape[1]), dtype=acc)
    return (torch.empty_like(x), stats, torch.empty_like(stats), torch.empty_like(stats),
            x.new_empty((num_tasks,), dtype=acc))


@torch.library.register_fake("tsbn::ts_bn_backward")
def _backward_fake(grad_y, x, weight, bias, mean, invstd, task_ids, num_tasks, training, sigmoid_gate, relu):
    dw = torch.empty_like(weight) if weight is not None else x.new_empty((0,))
    db = torch.empty_like(bias) if bias is not None else x.new_empty((0,))
    return torch.empty_like(x), dw, db


@torch.library.register_fake("tsbn::ts_bn_batch_stats")
def _batch_stats_fake(x, task_ids, num_tasks):
    stats = x.new_empty((num_tasks, x.shape[1]), dtype=accumulation_dtype(x.dtype))
    return stats, torch.empty_like(stats), x.new_empty((num_tasks,), dtype=stats.dtype)


@torch.library.register_fake("tsbn::ts_bn_backward_reduce")
def _backward_reduce_fake(grad_y, x, weight, bias, mean, invstd, task_ids, num_tasks, sigmoid_gate, relu):
    sums = x.new_empty((num_tasks, x.shape[1]), dtype=torch.float64)
    return sums, torch.empty_like(sums)


@torch.library.register_fake("tsbn::ts_bn_backward_elemt")
def _backward_elemt_fake(grad_y, x, weight, bias, mean, invstd, sum_dy, sum_dy_xmu, count, task_ids, num_tasks,
                         sigmoid_gate, relu):
    return torch.empty_like(x)


@torch.library.register_fake("tsbn::ts_bn_update_running_stats")
def _update_fake(running_mean, running_var, mean, var, count, momentum, momentum_per_task):
    return None


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _, task_ids, num_tasks, training, eps, sigmoid_gate, relu = inputs
    _, mean, invstd, _, _ = output
    ctx.save_for_backward(x, weight, bias, mean, invstd, task_ids)
    ctx.config = dict(num_tasks=num_tasks, training=training, eps=eps, sigmoid_gate=sigmoid_gate, relu=relu)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_y, *_stat_grads):
    x, weight, bias, mean, invstd, task_ids = ctx.saved_tensors
    if grad_y is None:
        return (None,) * 11
    if double_backward.records_graph(grad_y, x, weight, bias):
        return double_backward.batch_norm_grads(grad_y, x, weight, bias, mean, invstd, task_ids, **ctx.config,
                                                needs_input_grad=ctx.needs_input_grad[:3]) + (None,) * 8
    config = ctx.config
    dx, dw, db = _ops.ts_bn_backward(grad_y, x, weight, bias, mean, invstd, task_ids, config["num_tasks"],
                                     config["training"], config["sigmoid_gate"], config["relu"])
    return (dx if ctx.needs_input_grad[0] else None,
            dw if weight is not None and ctx.needs_input_grad[1] else None,
            db if bias is not None and ctx.needs_input_grad[2] else None) + (None,) * 8


torch.library.register_autograd("tsbn::ts_bn_forward", _backward, setup_context=_setup_context)


def ts_batch_norm(x: Tensor, weight, bias, running_mean, running_var, *, task_ids, num_tasks, training, momentum,
                  eps, gate, activation) -> Tensor:
    """The dispatch contract of ``tsbn_kernels.dispatch`` on the compiled ops."""
    y, mean, _, var, count = _ops.ts_bn_forward(x, weight, bias, running_mean, running_var, task_ids, num_tasks,
                                                training, eps, gate == "sigmoid", activation == "relu")
    if training and running_mean is not None:
        per_task = momentum if isinstance(momentum, Tensor) else None
        _ops.ts_bn_update_running_stats(running_mean, running_var, mean, var, count,
                                        0.0 if per_task is not None else float(momentum), per_task)
    return y


def _apply(x, weight, bias, mean, var, task_ids, num_tasks, eps, sigmoid_gate, relu) -> Tensor:
    """y with the given statistics: the eval forward, whose running statistics are these."""
    return _ops.ts_bn_forward(x, weight, bias, mean, var, task_ids, num_tasks, False, eps, sigmoid_gate, relu)[0]


# The cross-process path's passes are the same ops on either device (the CPU or the CUDA kernels of csrc/).
_SYNC_KERNELS = SyncKernels(stats=_ops.ts_bn_batch_stats, apply=_apply, reduce=_ops.ts_bn_backward_reduce,
                            elemt=_ops.ts_bn_backward_elemt)
dispatch.register("cpu", "ts_batch_norm", ts_batch_norm, ("cpu",))
register_sync_kernels("cpu", _SYNC_KERNELS, ("cpu",))
if _extension.has_cuda_kernels():
    dispatch.register("cuda", "ts_batch_norm", ts_batch_norm, ("cuda",))
    register_sync_kernels("cuda", _SYNC_KERNELS, ("cuda",))
