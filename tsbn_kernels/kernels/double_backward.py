"""Backward under ``create_graph=True`` for the fused ops: the reference's gradients, built with autograd.

The fused backward kernels return dx, dweight, dbias as plain tensors that autograd cannot differentiate, so a
second derivative through them (gradient penalties, MAML, Hessian-vector products, a GradNorm written with
``create_graph=True``) would silently lose the norm layer's terms. Grad mode is on inside a backward only while
autograd records it (``create_graph=True``); then, and only when something in the call requires grad, the fused
ops' backward returns these gradients instead, recomputed from the saved inputs through the eager reference so
that they carry their own graph. First-order training never takes this path.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import reference


def records_graph(*tensors: Tensor | None) -> bool:
    """True when the backward being run is itself recorded for a higher-order derivative."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(t is not None and t.requires_grad for t in tensors))


def batch_norm_grads(grad_y: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                     invstd: Tensor, task_ids: Tensor | None, *, num_tasks: int, training: bool, eps: float,
                     sigmoid_gate: bool, relu: bool, needs_input_grad: Sequence[bool]) -> tuple[Tensor | None, ...]:
    """(dx, dweight, dbias) of ts_batch_norm, differentiable. In training the statistics are recomputed from x (they
    depend on it); in eval the saved ones are the running statistics, constants."""
    gate, activation = ("sigmoid" if sigmoid_gate else "none"), ("relu" if relu else None)
    with torch.enable_grad():
        if training:
            y = reference.ts_batch_norm(x, weight, bias, task_ids=task_ids, num_tasks=num_tasks, training=True,
                                        eps=eps, gate=gate, activation=activation)
        else:
            y = reference.ts_batch_norm_with_statistics(x, weight, bias, mean, invstd, task_ids=task_ids,
                                                        num_tasks=num_tasks, gate=gate, activation=activation)
        return _input_grads(y, grad_y, (x, weight, bias), needs_input_grad)


def layer_norm_grads(grad_y: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                     task_ids: Tensor | None, *, num_tasks: int, eps: float, sigmoid_gate: bool,
                     needs_input_grad: Sequence[bool]) -> tuple[Tensor | None, ...]:
    """(dx, dweight, dbias) of ts_layer_norm, differentiable."""
    with torch.enable_grad():
        y = reference.ts_layer_norm(x, weight, bias, task_ids=task_ids, num_tasks=num_tasks, eps=eps,
                                    gate="sigmoid" if sigmoid_gate else "none")
        return _input_grads(y, grad_y, (x, weight, bias), needs_input_grad)


def _input_grads(y: Tensor, grad_y: Tensor, inputs: Sequence[Tensor | None],
                 needs_input_grad: Sequence[bool]) -> tuple[Tensor | None, ...]:
    wanted = [need and t is not None and t.requires_grad for t, need in zip(inputs, needs_input_grad)]
    grads = iter(torch.autograd.grad(y, [t for t, w in zip(inputs, wanted) if w], grad_y.to(y.dtype),
                                     create_graph=True, allow_unused=True))
    out = []
    for t, w in zip(inputs, wanted):
        g = next(grads) if w else None
        out.append(torch.zeros_like(t) if w and g is None else g)
    return tuple(out)
