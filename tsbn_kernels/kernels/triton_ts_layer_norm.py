"""Backend "triton" of ts_layer_norm: task-specific (sigmoid) layer norm for transformers.

x is seen as [B, L, D] (D = the flattened normalized_shape, L tokens per sample). Forward: a program normalises
a block of rows of one sample, so all its rows share one task and the task's gate and bias fold into the row
normalisation. Backward: a program walks a span of rows of one sample, writes dx row by row and keeps its
Σ dy·x̂ and Σ dy per feature in registers, so the per-(task, feature) parameter gradients come from one partial
row per program (a few per SM, not one per row block); a merge kernel sums the partial rows of each task in
row order — deterministic, no float atomics.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import dispatch
from ..reference import accumulation_dtype
from . import double_backward
from .triton_utils import accumulation_types, target_programs, task_of_samples

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Partial rows the merge kernel reads per step.
MERGE_ROWS = 4 if INTERPRET else 32


def _rows_block(d_block: int, values: int = 4096) -> int:
    """Rows per tile: about ``values`` values, so a thread holds a few vectors of each operand and nothing
    spills (the backward keeps six tile-sized operands and two accumulators live: half the forward's tile)."""
    if INTERPRET:
        return 2
    return max(1, min(16, values // d_block))


@triton.jit
def _ln_forward_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, ids_ptr, w_ptr, b_ptr, L, D, row_blocks, eps,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    sample = pid // row_blocks
    rows = (pid % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = tl.arange(0, BLOCK_D)
    r_ok = rows < L
    d_ok = ds < D
    mask = r_ok[:, None] & d_ok[None, :]
    row_index = sample.to(tl.int64) * L + rows
    offs = row_index[:, None] * D + ds[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    mean = tl.sum(x, axis=1) / D
    centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / D + eps)
    y = centered * rstd[:, None]
    t = tl.load(ids_ptr + sample)
    if HAS_WEIGHT:
        a = tl.load(w_ptr + t * D + ds, mask=d_ok, other=0.0).to(ACC)
        if SIGMOID:
            a = tl.sigmoid(a)
        y = y * a[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + t * D + ds, mask=d_ok, other=0.0).to(ACC)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row_index, mean, mask=r_ok)
    tl.store(rstd_ptr + row_index, rstd, mask=r_ok)


@triton.jit
def _ln_backward_kernel(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, ids_ptr, w_ptr, part_dw_ptr, part_db_ptr, L, D,
                        splits, iters, HAS_WEIGHT: tl.constexpr, SIGMOID: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    sample = pid // splits
    first_row = (pid % splits) * iters * BLOCK_M
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    t = tl.load(ids_ptr + sample)
    a = tl.full([BLOCK_D], 1.0, ACC)
    if HAS_WEIGHT:
        a = tl.load(w_ptr + t * D + ds, mask=d_ok, other=0.0).to(ACC)
        if SIGMOID:
            a = tl.sigmoid(a)
    dw = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    db = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for i in range(iters):
        rows = first_row + i * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = rows < L
        mask = r_ok[:, None] & d_ok[None, :]
        row_index = sample.to(tl.int64) * L + rows
        offs = row_index[:, None] * D + ds[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        mean = tl.load(mean_ptr + row_index, mask=r_ok, other=0.0)
        rstd = tl.load(rstd_ptr + row_index, mask=r_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * a[None, :]
        mean_g = tl.sum(g, axis=1) / D
        mean_gx = tl.sum(g * xhat, axis=1) / D
        dx = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    tl.store(part_dw_ptr + pid.to(tl.int64) * D + ds, tl.sum(dw, axis=0), mask=d_ok)
    tl.store(part_db_ptr + pid.to(tl.int64) * D + ds, tl.sum(db, axis=0), mask=d_ok)


@triton.jit
def _merge_rows_kernel(part_dw_ptr, part_db_ptr, ids_ptr, dw_ptr, db_ptr, D, programs, splits,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    t = tl.program_id(0)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    dw = tl.zeros([BLOCK_D], dtype=ACC)
    db = tl.zeros([BLOCK_D], dtype=ACC)
    for r0 in range(0, programs, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r_ok = rows < programs
        mine = r_ok & (tl.load(ids_ptr + rows // splits, mask=r_ok, other=-1) == t)
        mask = mine[:, None] & d_ok[None, :]
        offs = rows[:, None].to(tl.int64) * D + ds[None, :]
        dw += tl.sum(tl.load(part_dw_ptr + offs, mask=mask, other=0.0), axis=0)
        db += tl.sum(tl.load(part_db_ptr + offs, mask=mask, other=0.0), axis=0)
    tl.store(dw_ptr + t * D + ds, dw, mask=d_ok)
    tl.store(db_ptr + t * D + ds, db, mask=d_ok)


def _geometry(x: Tensor, normalized_ndim: int, tile_values: int = 4096) -> tuple[int, int, int, int, int, int]:
    batch = x.shape[0]
    d = 1
    for s in x.shape[x.dim() - normalized_ndim:]:
        d *= s
    tokens = x.numel() // max(batch * d, 1)
    block_d = triton.next_power_of_2(d)
    block_m = _rows_block(block_d, tile_values)
    row_blocks = triton.cdiv(tokens, block_m)
    return batch, tokens, d, block_d, block_m, row_blocks


def _backward_split(batch: int, row_blocks: int, device) -> tuple[int, int]:
    """(splits, iters): programs per sample and row blocks per program, about four programs per SM in all: enough
    loads in flight, and the partial rows stay under a tenth of the pass's traffic at ViT-S shapes."""
    splits = min(max(row_blocks, 1), max(1, triton.cdiv(target_programs(device, 4), max(batch, 1))))
    iters = triton.cdiv(max(row_blocks, 1), splits)
    return triton.cdiv(max(row_blocks, 1), iters), iters


@torch.library.custom_op("tsbn::triton_ln_forward", mutates_args=())
def triton_ln_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, task_ids: Tensor | None,
                      num_tasks: int, normalized_ndim: int, eps: float, sigmoid_gate: bool
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd) with one mean and rstd per token, in the accumulation dtype."""
    x = x.contiguous()
    batch, tokens, d, block_d, block_m, row_blocks = _geometry(x, normalized_ndim)
    acc, acc_tl = accumulation_types(x.dtype)
    ids = task_of_samples(task_ids, batch, num_tasks, x.device)
    y = torch.empty_like(x)
    mean = x.new_empty((batch * tokens,), dtype=acc)
    rstd = torch.empty_like(mean)
    null = x.new_empty((1,))
    if x.numel():
        _ln_forward_kernel[(batch * row_blocks,)](
            x, y, mean, rstd, ids, weight.contiguous() if weight is not None else null,
            bias.contiguous() if bias is not None else null,
            tokens, d, row_blocks, eps, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            SIGMOID=sigmoid_gate, BLOCK_M=block_m, BLOCK_D=block_d, ACC=acc_tl)
    return y, mean, rstd


@triton_ln_forward.register_fake
def _(x, weight, bias, task_ids, num_tasks, normalized_ndim, eps, sigmoid_gate):
    batch, tokens, *_ = _geometry(x, normalized_ndim)
    stats = x.new_empty((batch * tokens,), dtype=accumulation_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@torch.library.custom_op("tsbn::triton_ln_backward", mutates_args=())
def triton_ln_backward(grad_y: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                       rstd: Tensor, task_ids: Tensor | None, num_tasks: int, normalized_ndim: int,
                       sigmoid_gate: bool) -> tuple[Tensor, Tensor, Tensor]:
    x = x.contiguous()
    dy = grad_y.to(x.dtype).contiguous()
    batch, tokens, d, block_d, block_m, row_blocks = _geometry(x, normalized_ndim, tile_values=2048)
    acc, acc_tl = accumulation_types(x.dtype)
    ids = task_of_samples(task_ids, batch, num_tasks, x.device)
    splits, iters = _backward_split(batch, row_blocks, x.device)
    programs = batch * splits
    dx = torch.empty_like(x)
    part_dw = x.new_empty((programs, d), dtype=acc)
    part_db = torch.empty_like(part_dw)
    sums_dw = x.new_zeros((num_tasks, d), dtype=acc)
    sums_db = torch.zeros_like(sums_dw)
    if x.numel():
        _ln_backward_kernel[(programs,)](x, dy, dx, mean, rstd, ids,
                                         weight.contiguous() if weight is not None else x.new_empty((1,)),
                                         part_dw, part_db, tokens, d, splits, iters, HAS_WEIGHT=weight is not None,
                                         SIGMOID=sigmoid_gate, BLOCK_M=block_m, BLOCK_D=block_d, ACC=acc_tl)
        merge_d = 64 if INTERPRET else min(128, block_d)
        _merge_rows_kernel[(num_tasks, triton.cdiv(d, merge_d))](part_dw, part_db, ids, sums_dw, sums_db, d, programs,
                                                                 splits, BLOCK_R=MERGE_ROWS, BLOCK_D=merge_d,
                                                                 ACC=acc_tl)
    if weight is not None:
        grad_weight = sums_dw
        if sigmoid_gate:
            gate = torch.sigmoid(weight.to(acc)).reshape(num_tasks, d)
            grad_weight = grad_weight * gate * (1 - gate)
        grad_weight = grad_weight.reshape(weight.shape).to(weight.dtype)
    else:
        grad_weight = x.new_empty((0,))
    grad_bias = sums_db.reshape(bias.shape).to(bias.dtype) if bias is not None else x.new_empty((0,))
    return dx, grad_weight, grad_bias


@triton_ln_backward.register_fake
def _(grad_y, x, weight, bias, mean, rstd, task_ids, num_tasks, normalized_ndim, sigmoid_gate):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight) if weight is not None else x.new_empty((0,)),
            torch.empty_like(bias) if bias is not None else x.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, task_ids, num_tasks, normalized_ndim, eps, sigmoid_gate = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd, task_ids)
    ctx.config = (num_tasks, normalized_ndim, eps, sigmoid_gate)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y, *_):
    x, weight, bias, mean, rstd, task_ids = ctx.saved_tensors
    num_tasks, normalized_ndim, eps, sigmoid_gate = ctx.config
    if double_backward.records_graph(grad_y, x, weight, bias):
        return double_backward.layer_norm_grads(grad_y, x, weight, bias, task_ids, num_tasks=num_tasks, eps=eps,
                                                sigmoid_gate=sigmoid_gate,
                                                needs_input_grad=ctx.needs_input_grad[:3]) + (None,) * 5
    dx, dw, db = triton_ln_backward(grad_y, x, weight, bias, mean, rstd, task_ids, num_tasks, normalized_ndim,
                                    sigmoid_gate)
    return (dx if ctx.needs_input_grad[0] else None,
            dw if weight is not None and ctx.needs_input_grad[1] else None,
            db if bias is not None and ctx.needs_input_grad[2] else None) + (None,) * 5


triton_ln_forward.register_autograd(_backward, setup_context=_setup_context)


def ts_layer_norm(x: Tensor, weight, bias, *, task_ids, num_tasks, eps, gate) -> Tensor:
    params = weight if weight is not None else bias
    y, _, _ = triton_ln_forward(x, weight, bias, task_ids, num_tasks, params.dim() - 1, eps, gate == "sigmoid")
    return y


dispatch.register("triton", "ts_layer_norm", ts_layer_norm, ("cuda",))
