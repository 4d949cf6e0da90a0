"""One training-step helper: per-task gradients, aggregation, and the result left in .grad."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .gramian import combine, gramian
from .per_task_grads import OneBackward, _stack_losses, autograd_gradients


def backward_aggregated(losses: Tensor | Sequence[Tensor], shared_params: Sequence[Tensor] | None = None,
                        method: str = "mean", *, task_params: Sequence[Tensor] = (), capture: OneBackward | None = None,
                        loss_weights: Tensor | None = None, check_finite: bool = True, backend: str = "auto",
                        **method_kwargs) -> dict:
    """Like ``sum(losses).backward()``, but the shared parameters receive the aggregation of the per-task
    gradients (``method`` of tsbn_kernels.mtl) instead of their sum.

    Per-task gradients come from one backward when ``capture`` (a OneBackward used around the forward) is
    given — its ``params`` are then the shared parameters — else from T autograd passes over
    ``shared_params``. ``task_params`` (heads, task-specific norms) get their ordinary gradient of
    Σ_t loss_weights[t]·losses[t]. Gradients accumulate into .grad, as backward() does.
    Returns {"weights": w [T], "gramian": M [T, T], "grad_norms": |g_t| [T]} for logging and GradNorm.
    """
    from . import raise_if_nonfinite, weights

    losses = _stack_losses(losses)
    if check_finite:
        bad = ~torch.isfinite(losses.detach())
        if bool(bad.any()):   # name the culprits before autograd's 0·NaN spreads NaN to every task's gradient
            raise ValueError(f"the losses of task(s) {bad.nonzero().flatten().tolist()} are NaN or Inf: "
                             f"{losses.detach().tolist()}")
    if loss_weights is not None:
        losses = losses * loss_weights
    task_params = list(task_params)
    if capture is not None:
        shared = capture.params
        G, task_grads = capture.gradients(losses, task_params)
    else:
        if not shared_params:
            raise ValueError("pass shared_params, or a OneBackward capture of the forward")
        shared = list(shared_params)
        G = autograd_gradients(losses, shared)
        task_grads = (list(torch.autograd.grad(losses.sum(), task_params, allow_unused=True))
                      if task_params else [])
    M = gramian(G, backend=backend)
    if check_finite:
        raise_if_nonfinite(M)
    w = weights(M, method, **method_kwargs)
    direction = combine(G, w.to(M.dtype), backend=backend)
    offset = 0
    for p in shared:
        g = direction[offset:offset + p.numel()].view_as(p).to(p.dtype)
        p.grad = g.clone() if p.grad is None else p.grad + g
        offset += p.numel()
    for p, g in zip(task_params, task_grads):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
    return {"weights": w.detach(), "gramian": M.detach(), "grad_norms": M.diagonal().clamp_min(0).sqrt().detach()}
