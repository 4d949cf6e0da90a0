"""Drop-in task-specific norm layers: nn.BatchNorm / nn.LayerNorm arguments and state names, with a
leading task dimension on every parameter and buffer. The layers are thin: all work is in
``tsbn_kernels.functional``.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import Tensor, nn

from . import validation
from .context import current_task_ids
from .functional import ts_batch_norm, ts_layer_norm


def _check_sizes(cls: str, **sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{cls}: {name} must be a positive int, got {value!r}")


def _layer_task_ids(layer: nn.Module, task_ids: Tensor | None) -> Tensor | None:
    """The ids a layer runs with: its argument, else those of the innermost ``tk.task_ids`` block.

    A layer recomputed during the backward (torch.utils.checkpoint) runs after the ``tk.task_ids`` block of its
    forward has exited: with the ids of that block gone it would silently normalise with the task-major layout
    and give wrong gradients. Each forward records whether it took its ids from a block (the reentrant checkpoint
    runs it under no_grad); a recomputation (a forward inside a backward pass) that finds none where the forward
    had some raises instead.
    """
    if task_ids is not None:
        return task_ids
    ids = current_task_ids()
    if torch.compiler.is_compiling():
        return ids   # the ids are an input of the traced graph, which its recomputation replays
    if torch._C._current_graph_task_id() == -1:      # a forward, not a recomputation inside a backward
        layer.__dict__["_forward_took_context_ids"] = ids is not None
    elif ids is None and layer.__dict__.get("_forward_took_context_ids", False):
        raise RuntimeError(
            f"{type(layer).__name__}: recomputed during the backward (torch.utils.checkpoint) outside the "
            "tk.task_ids(...) block its forward ran in, so it would normalise with the task-major layout instead "
            "of those ids (wrong gradients). Pass the ids to the layers as task_ids=..., or re-enter the block "
            "for the recomputation: checkpoint(fn, x, use_reentrant=False, "
            "context_fn=lambda: (contextlib.nullcontext(), tk.task_ids(ids)))")
    return ids


def _refuse_torchscript(self):
    # torch.jit.script calls __prepare_scriptable__ on every submodule: fail there, by name, rather than deep
    # inside the compiler.
    raise RuntimeError(f"{type(self).__name__} does not support torch.jit.script; use torch.jit.trace, "
                       "torch.export or torch.compile (ONNX export works with both torch.onnx exporters)")


class _TSBatchNorm(nn.Module):
    """Common part of TSBatchNorm1d/2d/3d. ``bias=None`` means: a bias for gate="none" (plain per-task
    affine, the paper's TSBN), none for gate="sigmoid" (TSσBN has no β)."""

    _min_dim, _max_dim = 2, 5

    def __init__(self, num_features: int, num_tasks: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, gate: str = "sigmoid",
                 bias: bool | None = None, activation: str | None = None, backend: str = "auto",
                 device=None, dtype=None) -> None:
        super().__init__()
        name = type(self).__name__
        _check_sizes(name, num_features=num_features, num_tasks=num_tasks)
        num_features, num_tasks = int(num_features), int(num_tasks)   # numpy integers too, as nn.BatchNorm
        validation.check_scalars(name, eps, gate, momentum, activation)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.num_tasks = num_tasks
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.gate = gate
        self.activation = activation
        self.backend = backend
        self.sync = False            # cross-process statistics: tsbn_kernels.sync_batch_norm.convert_sync
        self.process_group = None
        shape = (num_tasks, num_features)
        if affine:
            self.weight = nn.Parameter(torch.empty(shape, **factory))
            has_bias = (gate == "none") if bias is None else bool(bias)
            self.bias = nn.Parameter(torch.empty(shape, **factory)) if has_bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(shape, **factory))
            self.register_buffer("running_var", torch.ones(shape, **factory))
            self.register_buffer("num_batches_tracked", torch.zeros(num_tasks, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.running_mean is not None:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            if self.gate == "sigmoid":
                nn.init.normal_(self.weight)  # gate logits ~ N(0, 1), as in the σBN reference code
            else:
                nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check_input_dim(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a torch.Tensor, got {type(x).__name__}")
        if not self._min_dim <= x.dim() <= self._max_dim:
            expected = f"{self._min_dim}D" + ("" if self._min_dim == self._max_dim else f" to {self._max_dim}D")
            raise ValueError(f"{type(self).__name__}: expected {expected} input, got {x.dim()}D input of shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}: expected {self.num_features} channels (dim 1), got input "
                             f"of shape {tuple(x.shape)}")

    def forward(self, x: Tensor, task_ids: Tensor | None = None) -> Tensor:
        self._check_input_dim(x)
        task_ids = _layer_task_ids(self, task_ids)
        # As nn.BatchNorm: batch statistics whenever training or no running statistics are kept; the
        # running statistics are read in eval and updated in training when they are tracked.
        batch_stats = self.training or self.running_mean is None
        use_running = not self.training or self.track_running_stats
        return ts_batch_norm(
            x, self.weight, self.bias,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            task_ids=task_ids, training=batch_stats, momentum=self.momentum, eps=self.eps, gate=self.gate,
            activation=self.activation, backend=self.backend, num_tasks=self.num_tasks,
            num_batches_tracked=self.num_batches_tracked if self.training and self.track_running_stats else None,
            sync=self.sync, process_group=self.process_group,
        )

    @torch.no_grad()
    def gate_values(self) -> Tensor | None:
        """The effective per-(task, channel) scale: sigmoid(weight) or weight; None without affine."""
        if self.weight is None:
            return None
        return torch.sigmoid(self.weight) if self.gate == "sigmoid" else self.weight.detach().clone()

    __prepare_scriptable__ = _refuse_torchscript

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_tasks={self.num_tasks}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, gate={self.gate!r}, "
                f"bias={self.bias is not None}, activation={self.activation!r}, backend={self.backend!r}")


class TSBatchNorm1d(_TSBatchNorm):
    """Task-specific batch norm over [N, C] or [N, C, L] inputs."""

    _min_dim, _max_dim = 2, 3


class TSBatchNorm2d(_TSBatchNorm):
    """Task-specific batch norm over [N, C, H, W] inputs (NCHW or channels_last)."""

    _min_dim, _max_dim = 4, 4


class TSBatchNorm3d(_TSBatchNorm):
    """Task-specific batch norm over [N, C, D, H, W] inputs."""

    _min_dim, _max_dim = 5, 5


class TSBatchNorm(_TSBatchNorm):
    """Any-rank (2D to 5D) task-specific batch norm: the conversion target of nn.SyncBatchNorm."""


class TSLayerNorm(nn.Module):
    """Task-specific (sigmoid-gated) layer norm for transformers: one gate (and optional bias) per task over
    ``normalized_shape``; the statistics are per token, as ``nn.LayerNorm``."""

    def __init__(self, normalized_shape: int | Sequence[int], num_tasks: int, eps: float = 1e-5,
                 gate: str = "sigmoid", bias: bool | None = None, backend: str = "auto", device=None,
                 dtype=None) -> None:
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        try:
            normalized_shape = tuple(normalized_shape)
        except TypeError:
            raise ValueError("TSLayerNorm: normalized_shape must be a positive int or a sequence of them, got "
                             f"{normalized_shape!r}") from None
        _check_sizes(type(self).__name__, num_tasks=num_tasks,
                     **{f"normalized_shape[{i}]": s for i, s in enumerate(normalized_shape)})
        if not normalized_shape:
            raise ValueError("TSLayerNorm: normalized_shape must not be empty")
        self.normalized_shape = tuple(int(s) for s in normalized_shape)
        validation.check_scalars(type(self).__name__, eps, gate)
        self.num_tasks = int(num_tasks)
        self.eps = eps
        self.gate = gate
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        shape = (num_tasks,) + self.normalized_shape
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        has_bias = (gate == "none") if bias is None else bool(bias)
        self.bias = nn.Parameter(torch.empty(shape, **factory)) if has_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.gate == "sigmoid":
            nn.init.normal_(self.weight)
        else:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, task_ids: Tensor | None = None) -> Tensor:
        task_ids = _layer_task_ids(self, task_ids)
        return ts_layer_norm(x, self.weight, self.bias, task_ids=task_ids, eps=self.eps, gate=self.gate,
                             backend=self.backend)

    @torch.no_grad()
    def gate_values(self) -> Tensor:
        return torch.sigmoid(self.weight) if self.gate == "sigmoid" else self.weight.detach().clone()

    __prepare_scriptable__ = _refuse_torchscript

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, num_tasks={self.num_tasks}, eps={self.eps}, gate={self.gate!r}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")
