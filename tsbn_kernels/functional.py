"""The public functional ops: validate once, then hand the call to the chosen backend."""
from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch, reference, validation


def ts_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    task_ids: Tensor | None = None,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    gate: str = "sigmoid",
    activation: str | None = None,
    backend: str = "auto",
    num_tasks: int | None = None,
    num_batches_tracked: Tensor | None = None,
    sync: bool = False,
    process_group=None,
) -> Tensor:
    """Task-specific (sigmoid) batch norm of ``x`` [N, C, *spatial] with per-task ``weight``/``bias`` [T, C].

    Each task's samples are normalised with that task's statistics (training) or running statistics
    (eval), scaled by ``sigmoid(weight[t])`` (``gate="sigmoid"``) or ``weight[t]`` (``gate="none"``), shifted
    by ``bias[t]`` and optionally passed through ``activation="relu"``. Samples belong to tasks in task-major
    blocks of N / T rows (the replicated batch) unless ``task_ids`` [N] names each sample's task.

    Running statistics [T, C] are updated in place in training, like ``F.batch_norm``; ``momentum=None``
    gives the cumulative average and needs ``num_batches_tracked`` [T] (int64), which is advanced for every
    task present in the batch whatever the momentum. ``num_tasks`` is needed only when no per-task tensor
    is given (affine=False and no running statistics). ``sync=True`` in training, with torch.distributed
    initialised and more than one process in ``process_group``, normalises each task with the statistics of its
    samples on every process (tsbn_kernels.sync_batch_norm: the backend's fused kernels between the collectives);
    a task may then have a single value on this process, and one with a single value over all processes normalises
    to its bias, unchecked (a check would cost a host sync per layer).
    """
    across_processes = sync and training and _distributed(process_group)
    layout = validation.check_batch_norm(x, weight, bias, running_mean, running_var, task_ids, num_tasks,
                                         num_batches_tracked, training, momentum, eps, gate, activation,
                                         across_processes=across_processes)
    if across_processes:
        _, sync_ts_batch_norm = dispatch.resolve(backend, x.device, "ts_batch_norm_sync")
        return sync_ts_batch_norm(x, weight, bias, running_mean, running_var, task_ids=layout.task_ids,
                                  num_tasks=layout.num_tasks, momentum=momentum, eps=float(eps), gate=gate,
                                  activation=activation, num_batches_tracked=num_batches_tracked,
                                  process_group=process_group)
    factor: float | Tensor = 0.0 if momentum is None else float(momentum)
    if training and running_mean is not None and num_batches_tracked is not None:
        with torch.no_grad():
            if layout.task_ids is None:
                num_batches_tracked.add_(int(x.shape[0] > 0))
            else:  # presence counted on the device: no host-to-device copy, so a CUDA graph can capture it
                present = reference.samples_per_task(layout.task_ids, layout.num_tasks) > 0
                num_batches_tracked.add_(present.long())
        if momentum is None:
            factor = 1.0 / num_batches_tracked.clamp_min(1).to(torch.float64)
    _, impl = dispatch.resolve(backend, x.device, "ts_batch_norm", x, training)
    if training and x.numel() == 0:
        impl = reference.ts_batch_norm  # as nn.BatchNorm: an empty batch gives an empty output, updates nothing
    return impl(x, weight, bias, running_mean, running_var, task_ids=layout.task_ids,
                num_tasks=layout.num_tasks, training=training, momentum=factor, eps=float(eps), gate=gate,
                activation=activation)


def _distributed(process_group) -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def ts_layer_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None = None,
    *,
    task_ids: Tensor | None = None,
    eps: float = 1e-5,
    gate: str = "sigmoid",
    backend: str = "auto",
    num_tasks: int | None = None,
) -> Tensor:
    """Task-specific (sigmoid) layer norm: ``F.layer_norm`` over the trailing ``weight.shape[1:]`` dims, then
    the task's gate ``sigmoid(weight[t])`` (or ``weight[t]`` for ``gate="none"``) and ``bias[t]``.

    ``x`` is [B, ..., *normalized_shape]; sample b belongs to task ``task_ids[b]``, or to task-major blocks
    of B / T samples when ``task_ids`` is None.
    """
    layout = validation.check_layer_norm(x, weight, bias, task_ids, num_tasks, eps, gate)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    _, impl = dispatch.resolve(backend, x.device, "ts_layer_norm", x, needs_grad)
    return impl(x, weight, bias, task_ids=layout.task_ids, num_tasks=layout.num_tasks, eps=float(eps),
                gate=gate)
