"""Backend "triton" of ts_layer_norm: task-specific (sigmoid) layer norm for transformers.

x is seen as [B, L, D] (D = the flattened normalized_shape, L tokens per sample). A program normalises a
block of rows of one sample, so all its rows share one task: forward folds the task's gate and bias into the
row normalisation; backward writes dx and per-program partial Σ dy·x̂ and Σ dy, which a merge kernel sums per
(task, feature) in program order — deterministic, no float atomics.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import dispatch
from ..reference import accumulation_dtype

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _rows_block(d_block: int) -> int:
    if INTERPRET:
        return 4
    return max(1, min(16, 8192 // d_block))


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
                        row_blocks, HAS_WEIGHT: tl.constexpr, SIGMOID: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_D: tl.constexpr, ACC: tl.constexpr):
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
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + row_index, mask=r_ok, other=0.0)
    rstd = tl.load(rstd_ptr + row_index, mask=r_ok, other=0.0)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    t = tl.load(ids_ptr + sample)
    g = dy
    if HAS_WEIGHT:
        a = tl.load(w_ptr + t * D + ds, mask=d_ok, other=0.0).to(ACC)
        if SIGMOID:
            a = tl.sigmoid(a)
        g = dy * a[None, :]
    mean_g = tl.sum(g, axis=1) / D
    mean_gx = tl.sum(g * xhat, axis=1) / D
    dx = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(part_dw_ptr + pid.to(tl.int64) * D + ds, tl.sum(dy * xhat, axis=0), mask=d_ok)
    tl.store(part_db_ptr + pid.to(tl.int64) * D + ds, tl.sum(dy, axis=0), mask=d_ok)


@triton.jit
def _merge_rows_kernel(part_dw_ptr, part_db_ptr, ids_ptr, dw_ptr, db_ptr, D, programs, row_blocks,
                       BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    t = tl.program_id(0)
    d_blk = tl.program_id(1)
    ds = d_blk * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    dw = tl.zeros([BLOCK_D], dtype=ACC)
    db = tl.zeros([BLOCK_D], dtype=ACC)
    for p in range(programs):
        mine = tl.load(ids_ptr + p // row_blocks) == t
        dw += tl.where(mine, tl.load(part_dw_ptr + p * D + ds, mask=d_ok, other=0.0), 0.0)
        db += tl.where(mine, tl.load(part_db_ptr + p * D + ds, mask=d_ok, other=0.0), 0.0)
    tl.store(dw_ptr + t * D + ds, dw, mask=d_ok)
    tl.store(db_ptr + t * D + ds, db, mask=d_ok)


def _geometry(x: Tensor, normalized_ndim: int) -> tuple[int, int, int, int, int, int]:
    batch = x.shape[0]
    d = 1
    for s in x.shape[x.dim() - normalized_ndim:]:
        d *= s
    tokens = x.numel() // max(batch * d, 1)
    block_d = triton.next_power_of_2(d)
    block_m = _rows_block(block_d)
    row_blocks = triton.cdiv(tokens, block_m)
    return batch, tokens, d, block_d, block_m, row_blocks


def _task_of_samples(task_ids: Tensor | None, batch: int, num_tasks: int, device) -> Tensor:
    if task_ids is not None:
        return task_ids.to(torch.int32)
    return torch.arange(batch, device=device, dtype=torch.int32) // max(batch // num_tasks, 1)


def _acc(x: Tensor):
    acc = accumulation_dtype(x.dtype)
    return acc, tl.float64 if acc == torch.float64 else tl.float32


@torch.library.custom_op("tsbn::triton_ln_forward", mutates_args=())
def triton_ln_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, task_ids: Tensor | None,
                      num_tasks: int, normalized_ndim: int, eps: float, sigmoid_gate: bool
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd) with one mean and rstd per token, in the accumulation dtype."""
    x = x.contiguous()
    batch, tokens, d, block_d, block_m, row_blocks = _geometry(x, normalized_ndim)
    acc, acc_tl = _acc(x)
    ids = _task_of_samples(task_ids, batch, num_tasks, x.device)
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
    batch, tokens, d, block_d, block_m, row_blocks = _geometry(x, normalized_ndim)
    acc, acc_tl = _acc(x)
    ids = _task_of_samples(task_ids, batch, num_tasks, x.device)
    programs = batch * row_blocks
    dx = torch.empty_like(x)
    part_dw = x.new_empty((programs, d), dtype=acc)
    part_db = torch.empty_like(part_dw)
    _ln_backward_kernel[(programs,)](x, dy, dx, mean, rstd, ids,
                                     weight.contiguous() if weight is not None else x.new_empty((1,)),
                                     part_dw, part_db, tokens, d, row_blocks, HAS_WEIGHT=weight is not None,
                                     SIGMOID=sigmoid_gate, BLOCK_M=block_m, BLOCK_D=block_d, ACC=acc_tl)
    sums_dw = x.new_empty((num_tasks, d), dtype=acc)
    sums_db = torch.empty_like(sums_dw)
    merge_d = 64 if INTERPRET else min(256, block_d)
    _merge_rows_kernel[(num_tasks, triton.cdiv(d, merge_d))](part_dw, part_db, ids, sums_dw, sums_db, d, programs,
                                                             row_blocks, BLOCK_D=merge_d, ACC=acc_tl)
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
    x, weight, bias, task_ids, num_tasks, normalized_ndim, _, sigmoid_gate = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd, task_ids)
    ctx.config = (num_tasks, normalized_ndim, sigmoid_gate)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y, *_):
    x, weight, bias, mean, rstd, task_ids = ctx.saved_tensors
    num_tasks, normalized_ndim, sigmoid_gate = ctx.config
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
