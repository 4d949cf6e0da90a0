"""One training-step helper: per-task gradients, aggregation, and the result left in .grad."""
from __future__ import annotations

import warnings
import weakref
from typing import Sequence

import torch
from torch import Tensor, nn

from .gramian import combine, gramian
from ..modules import TSLayerNorm, _TSBatchNorm
from .per_task_grads import OneBackward, _autograd_gradients, _stack_losses, unique

# Models whose default task_params were checked for parameters several tasks share (once per model).
_task_params_checked: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def backward_aggregated(losses: Tensor | Sequence[Tensor], shared_params: Sequence[Tensor] | None = None,
                        method: str = "mean", *, task_params: Sequence[Tensor] | None = None,
                        capture: OneBackward | None = None, loss_weights: Tensor | None = None,
                        check_finite: bool = True, backend: str = "auto", distributed: bool = False,
                        process_group=None, grad_scaler=None, **method_kwargs) -> dict:
    """Like ``sum(losses).backward()``, but the shared parameters receive the aggregation of the per-task
    gradients (``method`` of tsbn_kernels.mtl) instead of their sum.

    Per-task gradients come from one backward when ``capture`` (a OneBackward used around the forward) is
    given — its ``params`` are then the shared parameters — else from T autograd passes over
    ``shared_params``. ``task_params`` (heads, task-specific norms) get their ordinary gradient of
    Σ_t loss_weights[t]·losses[t]; None: with a capture, every other trainable parameter of its model (so that
    each parameter gets a gradient, as from backward()), else none. With a capture, a trainable parameter the losses
    reach that is neither shared nor in ``task_params`` raises a ValueError (checked once per model): it would
    get no gradient. Gradients accumulate into .grad, as backward() does.
    Returns {"weights": w [T], "gramian": M [T, T], "grad_norms": |g_t| [T], "losses": [T]} for logging and
    GradNorm: g_t is the gradient of the weighted loss loss_weights[t]·L_t, "losses" the unweighted L_t.

    ``distributed=True`` (data-parallel training, each process holding a shard of the batch): G and the
    task-parameter gradients are averaged across the processes of ``process_group`` before the Gramian, as
    DDP averages gradients, so every process solves the same problem and takes the same step; the returned
    losses are the processes' mean, and a non-finite loss on any process raises on all of them.

    ``grad_scaler`` (a torch.amp.GradScaler, for float16 autocast): pass the unscaled losses; they are multiplied
    by the scaler's scale before the backward, so that small float16 gradients do not flush to zero, and G is
    divided by it again before the Gramian: the weighting sees the true per-task gradients (several methods are
    not homogeneous in G, so weighting the scaled G and unscaling the result would not be the same step). .grad
    receives the aggregate times the scale, as ``grad_scaler.scale(loss).backward()`` leaves it, so
    ``grad_scaler.step(optimizer); grad_scaler.update()`` follow as usual. A float16 overflow in the backward is
    not an error then: it makes G and so .grad non-finite (whatever the weights, Inf·w is Inf or NaN), which the
    scaler's step detects and skips, lowering the scale; check_finite still checks the losses.
    """
    from . import raise_if_nonfinite, weights

    losses = _stack_losses(losses)
    reported = losses.detach().clone()
    if distributed:
        average_across_ranks_([reported], process_group)
    if check_finite:
        bad = ~torch.isfinite(reported)
        if bool(bad.any()):   # name the culprits before autograd's 0·NaN spreads NaN to every task's gradient
            raise ValueError(f"the losses of task(s) {bad.nonzero().flatten().tolist()} are NaN or Inf: "
                             f"{losses.detach().tolist()}")
    if loss_weights is not None:
        losses = losses * loss_weights
    # The scale as a device tensor through the scaler's public API (no host read); a power of two, so scaling
    # and unscaling are exact.
    scale = None
    if grad_scaler is not None and grad_scaler.is_enabled():
        scale = grad_scaler.scale(torch.ones((), dtype=torch.float32, device=losses.device))
        losses = losses.to(torch.promote_types(losses.dtype, torch.float32)) * scale
    # Each parameter once (a tied or repeated one would get its gradient twice and count twice in the Gramian),
    # and never both shared and task-specific (it would get the aggregate and the plain gradient on top).
    if capture is None and not shared_params:
        raise ValueError("pass shared_params, or a OneBackward capture of the forward")
    shared = capture.params if capture is not None else unique(shared_params)
    shared_ids = {id(p) for p in shared}
    if task_params is None:
        task_params = [] if capture is None else [p for p in capture.model.parameters()
                                                  if p.requires_grad and id(p) not in shared_ids]
        if capture is not None and capture.model not in _task_params_checked:
            _warn_about_shared_task_params(losses, capture.model, task_params)
    task_params = unique(task_params)
    both = [i for i, p in enumerate(task_params) if id(p) in shared_ids]
    if both:
        raise ValueError(f"task_params {both} (by position) are also shared parameters"
                         f"{' of the OneBackward capture' if capture is not None else ''}; a parameter is either "
                         "aggregated across tasks or given its plain gradient, not both")
    if capture is not None:
        G, task_grads = capture.gradients(losses, task_params, every_parameter=True)
        reached = capture.reached
    else:
        G, reached = _autograd_gradients(losses, shared)
        task_grads = (list(torch.autograd.grad(losses.sum(), task_params, allow_unused=True))
                      if task_params else [])
    if distributed:
        task_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(task_params, task_grads)]
        average_across_ranks_([G, *task_grads], process_group)
    if scale is not None:
        G.div_(scale.to(G.dtype))               # G is this call's own buffer
    M = gramian(G, backend=backend)
    if check_finite and scale is None:
        raise_if_nonfinite(M)
    w = weights(M, method, **method_kwargs)
    direction = combine(G, w.to(M.dtype), backend=backend)
    if scale is not None:
        direction = direction * scale.to(direction.dtype)
    offset = 0
    for p in shared:
        if id(p) in reached:   # one no loss reaches keeps its .grad (None), as after backward()
            g = direction[offset:offset + p.numel()].view_as(p).to(p.dtype)
            p.grad = g.clone() if p.grad is None else p.grad + g
        offset += p.numel()
    for p, g in zip(task_params, task_grads):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
    return {"weights": w.detach(), "gramian": M.detach(), "grad_norms": M.diagonal().clamp_min(0).sqrt().detach(),
            "losses": reported}


def _warn_about_shared_task_params(losses: Tensor, model: nn.Module, task_params: Sequence[Tensor]) -> None:
    """Warn about the parameters of the default task_params (every parameter OneBackward does not split) that more
    than one task's loss reaches element by element: a raw nn.Parameter of the shared trunk (a layer scale, a class
    token used after mtl.replicate) would get the plain sum of the tasks' gradients, not the aggregate, silently.
    The parameters of task-specific norms and of per-task heads are one task's each (per element), so they cost
    nothing here but a backward through the heads; run once per model, on its first step."""
    _task_params_checked.add(model)
    norm_params = {id(p) for m in model.modules() if isinstance(m, (_TSBatchNorm, TSLayerNorm)) for p in m.parameters()}
    candidates = [p for p in task_params if id(p) not in norm_params]
    if not candidates or losses.dim() != 1 or losses.shape[0] < 2 or not losses.requires_grad:
        return
    reached = [torch.zeros(p.shape, dtype=torch.int32, device=p.device) for p in candidates]
    for t in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[t], candidates, retain_graph=True, allow_unused=True)
        for count, g in zip(reached, grads):
            if g is not None:
                count += (g != 0).to(torch.int32)
    shared = [p for p, count in zip(candidates, reached) if bool((count > 1).any())]
    if shared:
        names = {id(p): n for n, p in model.named_parameters()}
        listed = ", ".join(names.get(id(p), f"a {tuple(p.shape)} parameter") for p in shared[:5])
        more = f" and {len(shared) - 5} more" if len(shared) > 5 else ""
        warnings.warn(f"backward_aggregated: {listed}{more} get gradients from several tasks' losses but are not "
                      "among the parameters OneBackward splits, so they receive the plain sum of the tasks' "
                      "gradients, not the aggregate. If they are shared parameters: pass those used before "
                      "mtl.replicate as before_replication=, or aggregate them with backward_aggregated(losses, "
                      "shared_params=...) (T autograd passes); pass task_params= explicitly to keep the sum and "
                      "silence this", stacklevel=3)


def average_across_ranks_(tensors: Sequence[Tensor], process_group=None) -> None:
    """Average tensors across the processes in place with one all_reduce of their concatenation (as DDP's
    gradient buckets do)."""
    import torch.distributed as dist

    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.promote_types(t.dtype, torch.float32)) for t in tensors])
    dist.all_reduce(flat, group=process_group)
    flat /= dist.get_world_size(process_group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
