"""Per-task gradients G [T, P] of the shared parameters.

One backward (DESIGN.md §3): in the replicated batch, with task-specific norms as the only layers that mix
samples, task t's loss depends on block t of every shared layer's input and output alone. So one
torch.autograd.grad of Σ_t L_t with respect to the *outputs* of the shared Conv/Linear layers (not their
weights) yields every block's output gradient, and each layer's weight gradient splits exactly into T
per-block gradients: a weight-gradient convolution per block or one grouped over the blocks (or a batched
matmul), the same FLOPs as the one summed weight gradient it replaces. They are written straight into the rows
of G.

Fallback (any model): T autograd passes, one per task loss.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _stack_losses(losses: Tensor | Sequence[Tensor]) -> Tensor:
    stacked = losses if isinstance(losses, Tensor) else torch.stack(list(losses))
    if stacked.dim() != 1 or stacked.numel() < 1:
        raise ValueError(f"losses must be T scalars (one per task), got shape {tuple(stacked.shape)}")
    return stacked


def autograd_gradients(losses: Tensor | Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """G [T, P] by T autograd passes (any model). P = the params' numels, concatenated in order."""
    losses = _stack_losses(losses)
    params = list(params)
    total = sum(p.numel() for p in params)
    G = torch.zeros(losses.shape[0], total, dtype=params[0].dtype, device=params[0].device)
    for t in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
        offset = 0
        for p, g in zip(params, grads):
            if g is not None:
                G[t, offset:offset + p.numel()] = g.reshape(-1)
            offset += p.numel()
    return G


class OneBackward:
    """Records the shared Conv/Linear layers of a replicated-batch forward, then gives all T per-task gradients
    of their parameters from one backward pass.

        with OneBackward(model, num_tasks) as capture:
            losses = task_losses(model(x.repeat(T, ...)))
        G, other_grads = capture.gradients(losses, other_params)   # G: [T, P] over capture.params

    ``capture.params`` lists the parameters in G's column order (weights then biases of each layer, in
    module order). Parameters in ``other_params`` (task-specific ones) get their ordinary gradient of Σ losses.
    """

    def __init__(self, model: nn.Module, num_tasks: int, modules: Iterable[nn.Module] | None = None):
        self.num_tasks = num_tasks
        self.modules = [m for m in (modules if modules is not None else model.modules())
                        if isinstance(m, _SUPPORTED) and m.weight.requires_grad]
        for m in self.modules:
            if not isinstance(m, nn.Linear) and (isinstance(m.padding, str) or m.padding_mode != "zeros"):
                raise ValueError(f"OneBackward supports convolutions with numeric zero padding; {m} has "
                                 f"padding={m.padding!r}, padding_mode={m.padding_mode!r}")
        if not self.modules:
            raise ValueError("OneBackward found no Conv/Linear layer with trainable weights to split by task")
        self.params = [p for m in self.modules for p in (m.weight, m.bias) if p is not None and p.requires_grad]
        self._records: list[tuple[nn.Module, Tensor, Tensor]] = []
        self._handles = []

    def __enter__(self) -> "OneBackward":
        self._records.clear()
        self._handles = [m.register_forward_hook(self._record) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # Never traced: inside a torch.compile'd model a traced hook would record tensors that the graph hands out as
    # extra outputs, cut off from the autograd path to the losses (every per-task gradient silently zero). Disabled,
    # the hook splits the graph there and records the real output.
    @torch.compiler.disable
    def _record(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        x = inputs[0]
        if x.shape[0] % self.num_tasks:
            raise ValueError(f"{type(module).__name__} received a batch of {x.shape[0]} rows, not divisible into "
                             f"{self.num_tasks} task blocks; run every shared layer on the replicated batch")
        if not output.requires_grad:
            raise ValueError(f"the output of {type(module).__name__} does not require grad; OneBackward needs the "
                             "shared layers to be trainable and their forward recorded by autograd (not under "
                             "torch.no_grad, nor inside a reentrant torch.utils.checkpoint: use use_reentrant=False)")
        self._records.append((module, x.detach(), output))

    def gradients(self, losses: Tensor | Sequence[Tensor], other_params: Sequence[Tensor] = ()
                  ) -> tuple[Tensor, list[Tensor | None]]:
        losses = _stack_losses(losses)
        if losses.shape[0] != self.num_tasks:
            raise ValueError(f"got {losses.shape[0]} losses for {self.num_tasks} tasks")
        if not self._records:
            raise RuntimeError("no forward was recorded: compute the losses inside `with capture:`")
        records = self._records
        outputs = [out for _, _, out in records]
        other_params = list(other_params)
        grads = torch.autograd.grad(losses.sum(), outputs + other_params, allow_unused=True)
        out_grads, other_grads = grads[:len(outputs)], list(grads[len(outputs):])
        layout = {}
        offset = 0
        for p in self.params:
            layout[id(p)] = (offset, p.numel())
            offset += p.numel()
        G = torch.zeros(self.num_tasks, offset, dtype=self.params[0].dtype, device=self.params[0].device)
        for (module, x, _), dy in zip(records, out_grads):
            if dy is None:
                continue
            weight_grads, bias_grads = _per_block_grads(module, x, dy, self.num_tasks)
            start, size = layout[id(module.weight)]
            G[:, start:start + size] += weight_grads.reshape(self.num_tasks, -1).to(G.dtype)
            if module.bias is not None and module.bias.requires_grad:
                start, size = layout[id(module.bias)]
                G[:, start:start + size] += bias_grads.reshape(self.num_tasks, -1).to(G.dtype)
        self._records = []
        return G, other_grads


# Per-block weight-gradient work (multiply-adds) from which one convolution per block beats one grouped convolution
# over all blocks. Measured on the CPU (oneDNN): the loop is 1.2–4× faster at 2e8–6e8 (ResNet layers, 8 rows a
# block) and costs ~0.2 ms a call, so at T=40 blocks of 1e6–5e6 the grouped form is up to 5× faster.
LOOP_MIN_BLOCK_MACS = 5e7


def _per_block_grads(module: nn.Module, x: Tensor, dy: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """Weight and bias gradients of each of the T task blocks: [T, *weight.shape], [T, out].

    Computed in the dtype the layer ran in, which its output gradient has: under autocast the ordinary backward
    forms the weight gradient from the cast input in that dtype too (and at its speed), then widens it.
    Convolutions: one weight-gradient convolution per block on the block's rows (views, nothing copied) when a
    block holds enough work, else one grouped convolution over the blocks set side by side in channels (a
    transposed copy of x and dy, one call)."""
    rows = x.shape[0] // T
    x = x.to(dy.dtype)
    if isinstance(module, nn.Linear):
        xb = x.reshape(T, -1, x.shape[-1])
        gb = dy.reshape(T, -1, dy.shape[-1])
        return torch.bmm(gb.transpose(1, 2), xb), gb.sum(dim=1)
    # Splitting the batch dimension into [T, rows] is a view in every memory format.
    blocks_x, blocks_dy = x.reshape(T, rows, *x.shape[1:]), dy.reshape(T, rows, *dy.shape[1:])
    bias = blocks_dy.sum(dim=(1, *range(3, blocks_dy.dim())))
    weight_grad_fn = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                      3: torch.nn.grad.conv3d_weight}[module.weight.dim() - 2]
    conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
    if rows * math.prod(dy.shape[2:]) * module.weight.numel() >= LOOP_MIN_BLOCK_MACS:
        return torch.stack([weight_grad_fn(blocks_x[t], module.weight.shape, blocks_dy[t], groups=module.groups,
                                           **conv) for t in range(T)]), bias
    # The T blocks become T·groups groups of one convolution: [rows, T·C, *spatial] ⊛ [rows, T·O, *spatial].
    xg = blocks_x.transpose(0, 1).reshape(rows, T * x.shape[1], *x.shape[2:])
    gg = blocks_dy.transpose(0, 1).reshape(rows, T * dy.shape[1], *dy.shape[2:])
    grouped_shape = (T * module.weight.shape[0], *module.weight.shape[1:])
    wg = weight_grad_fn(xg, grouped_shape, gg, groups=module.groups * T, **conv)
    return wg.reshape(T, *module.weight.shape), bias
