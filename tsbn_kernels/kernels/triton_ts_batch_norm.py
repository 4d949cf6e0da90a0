"""Backend "triton": task-specific (sigmoid) batch norm as Triton kernels.

The input is viewed as [N, C, S] with its own strides, so NCHW and channels-last run without copies. Work is
split into tiles of (one sample, a chunk of S, a tile of C): every tile belongs to exactly one task, which
makes the reduction split independent of the task layout and fills the GPU (N·⌈S/BLOCK_S⌉·⌈C/BLOCK_C⌉
programs, never only T·C). Tiles write partial moments (two-pass mean and M2 from registers) or partial
gradient sums; a merge kernel combines them per (task, channel) in tile order with Chan's formula — no
float atomics, so results are deterministic. Gate, affine, mean and rstd are folded into per-(task, channel)
coefficients inside the apply kernels; the relu mask of the backward is recomputed from x.

Registered with torch.library.custom_op (opaque to torch.compile, with fake impls and autograd) rather than
triton_op: triton_op's tracing into the kernel fails under TRITON_INTERPRET=1, which the CPU test suite uses.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import dispatch, tuning
from ..reference import accumulation_dtype

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _view_ncs(x: Tensor) -> tuple[int, int, int, int, int, int]:
    """(N, C, S, stride_n, stride_c, stride_s) of x seen as [N, C, S]; needs S dims mergeable."""
    n, c = x.shape[0], x.shape[1]
    s = x[0, 0].numel() if n and c else 0
    if x.dim() == 2:
        return n, c, 1, x.stride(0), x.stride(1), 1
    spatial_strides = x.stride()[2:]
    return n, c, s, x.stride(0), x.stride(1), spatial_strides[-1] if s > 1 else 1


def _dense(x: Tensor) -> Tensor:
    """x if its spatial dims merge into one strided dim (NCHW, channels-last, ...), else a contiguous copy."""
    if x.dim() <= 3:
        return x if x.dim() == 2 or x.stride(2) == 1 or x.shape[2] == 1 else x.contiguous()
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last if x.dim() == 4
                                            else torch.channels_last_3d):
        return x
    return x.contiguous()


def _blocks(c: int, s: int, channels_fast: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S): the contiguous dim gets the long side of the tile for coalesced loads."""
    if INTERPRET:
        return 16, 32
    if channels_fast:
        return min(64, triton.next_power_of_2(c)), 64
    return min(4, triton.next_power_of_2(c)), min(1024, max(16, triton.next_power_of_2(s)))


@triton.jit
def _moments_kernel(x_ptr, mean_ptr, m2_ptr, cnt_ptr, C, S, stride_n, stride_c, stride_s, chunks,
                    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    tile = tl.program_id(0)          # tile = n * chunks + chunk
    c_blk = tl.program_id(1)
    n = tile // chunks
    chunk = tile % chunks
    cs = c_blk * BLOCK_C + tl.arange(0, BLOCK_C)
    ss = chunk * BLOCK_S + tl.arange(0, BLOCK_S)
    c_ok = cs < C
    s_ok = ss < S
    mask = c_ok[:, None] & s_ok[None, :]
    ptrs = x_ptr + n.to(tl.int64) * stride_n + cs[:, None].to(tl.int64) * stride_c + ss[None, :].to(tl.int64) * stride_s
    x = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
    # Shifted by the tile's first value per channel: the sum then stays exact when |mean| >> std.
    first = n.to(tl.int64) * stride_n + cs.to(tl.int64) * stride_c + (chunk * BLOCK_S).to(tl.int64) * stride_s
    pivot = tl.load(x_ptr + first, mask=c_ok, other=0.0).to(ACC)
    count = tl.sum(s_ok.to(ACC), axis=0)
    mean = pivot + tl.sum(tl.where(mask, x - pivot[:, None], 0.0), axis=1) / count
    d = tl.where(mask, x - mean[:, None], 0.0)
    m2 = tl.sum(d * d, axis=1)
    tl.store(mean_ptr + tile * C + cs, mean, mask=c_ok)
    tl.store(m2_ptr + tile * C + cs, m2, mask=c_ok)
    if c_blk == 0:
        tl.store(cnt_ptr + tile, count)


@triton.jit
def _merge_moments_kernel(mean_ptr, m2_ptr, cnt_ptr, ids_ptr, out_mean_ptr, out_var_ptr, out_invstd_ptr,
                          out_cnt_ptr, C, tiles, chunks, eps, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    t = tl.program_id(0)
    c_blk = tl.program_id(1)
    cs = c_blk * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    # The merge runs in float64 whatever the input: it touches [tiles, C] values only, and fp32 rounding of a
    # running mean with |mean| >> std would otherwise grow with the number of tiles.
    n_acc = tl.zeros([BLOCK_C], dtype=tl.float64)
    mean = tl.zeros([BLOCK_C], dtype=tl.float64)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for tile in range(tiles):
        mine = (tl.load(ids_ptr + tile // chunks) == t).to(tl.float64)
        nb = tl.load(cnt_ptr + tile).to(tl.float64) * mine
        mb = tl.load(mean_ptr + tile * C + cs, mask=c_ok, other=0.0).to(tl.float64)
        qb = tl.load(m2_ptr + tile * C + cs, mask=c_ok, other=0.0).to(tl.float64)
        total = n_acc + nb
        safe = tl.maximum(total, 1.0)
        delta = mb - mean
        mean = mean + delta * (nb / safe)
        m2 = m2 + qb * mine + delta * delta * (n_acc * nb / safe)
        n_acc = total
    var = m2 / tl.maximum(n_acc, 1.0)
    tl.store(out_mean_ptr + t * C + cs, mean.to(ACC), mask=c_ok)
    tl.store(out_var_ptr + t * C + cs, var.to(ACC), mask=c_ok)
    tl.store(out_invstd_ptr + t * C + cs, (1.0 / tl.sqrt(var + eps)).to(ACC), mask=c_ok)
    if c_blk == 0:
        tl.store(out_cnt_ptr + t, tl.max(n_acc, axis=0).to(ACC))


@triton.jit
def _coefficients(w_ptr, b_ptr, k, c_ok, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                  SIGMOID: tl.constexpr, ACC: tl.constexpr):
    a = tl.full(k.shape, 1.0, ACC)
    if HAS_WEIGHT:
        a = tl.load(w_ptr + k, mask=c_ok, other=0.0).to(ACC)
        if SIGMOID:
            a = tl.sigmoid(a)
    shift = tl.zeros(k.shape, dtype=ACC)
    if HAS_BIAS:
        shift = tl.load(b_ptr + k, mask=c_ok, other=0.0).to(ACC)
    return a, shift


@triton.jit
def _task_tile(tile, c_blk, ids_ptr, C, S, stride_n, stride_c, stride_s, chunks, BLOCK_C: tl.constexpr,
               BLOCK_S: tl.constexpr):
    """Coordinates of one (sample, S-chunk, channel-tile) tile: its task t, channels, mask, element offsets and
    the (task, channel) indices k of its per-(task, channel) coefficients."""
    n = tile // chunks
    chunk = tile % chunks
    t = tl.load(ids_ptr + n)
    cs = c_blk * BLOCK_C + tl.arange(0, BLOCK_C)
    ss = chunk * BLOCK_S + tl.arange(0, BLOCK_S)
    c_ok = cs < C
    mask = c_ok[:, None] & (ss < S)[None, :]
    offs = n.to(tl.int64) * stride_n + cs[:, None].to(tl.int64) * stride_c + ss[None, :].to(tl.int64) * stride_s
    return t, cs, c_ok, mask, t * C + cs, offs


@triton.jit
def _apply_kernel(x_ptr, y_ptr, ids_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, C, S, stride_n, stride_c, stride_s,
                  chunks, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr,
                  RELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    # Programs run in reverse tile order: the tiles the statistics pass read last are still in L2.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    t, cs, c_ok, mask, k, offs = _task_tile(tile, tl.program_id(1), ids_ptr, C, S, stride_n, stride_c, stride_s,
                                            chunks, BLOCK_C, BLOCK_S)
    mean = tl.load(mean_ptr + k, mask=c_ok, other=0.0)
    a, shift = _coefficients(w_ptr, b_ptr, k, c_ok, HAS_WEIGHT, HAS_BIAS, SIGMOID, ACC)
    scale = a * tl.load(invstd_ptr + k, mask=c_ok, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    y = (x - mean[:, None]) * scale[:, None] + shift[:, None]
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sums_kernel(x_ptr, dy_ptr, ids_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, s1_ptr, s2_ptr, C, S,
                      stride_n, stride_c, stride_s, chunks, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SIGMOID: tl.constexpr, RELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                      ACC: tl.constexpr):
    tile = tl.program_id(0)
    t, cs, c_ok, mask, k, offs = _task_tile(tile, tl.program_id(1), ids_ptr, C, S, stride_n, stride_c, stride_s,
                                            chunks, BLOCK_C, BLOCK_S)
    mean = tl.load(mean_ptr + k, mask=c_ok, other=0.0)
    d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - mean[:, None]
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    if RELU:
        a, shift = _coefficients(w_ptr, b_ptr, k, c_ok, HAS_WEIGHT, HAS_BIAS, SIGMOID, ACC)
        scale = a * tl.load(invstd_ptr + k, mask=c_ok, other=0.0)
        g = tl.where(d * scale[:, None] + shift[:, None] > 0.0, g, 0.0)
    g = tl.where(mask, g, 0.0)
    tl.store(s1_ptr + tile * C + cs, tl.sum(g, axis=1), mask=c_ok)
    tl.store(s2_ptr + tile * C + cs, tl.sum(g * tl.where(mask, d, 0.0), axis=1), mask=c_ok)


@triton.jit
def _merge_sums_kernel(s1_ptr, s2_ptr, ids_ptr, out_s1_ptr, out_s2_ptr, C, tiles, chunks, BLOCK_C: tl.constexpr,
                       ACC: tl.constexpr):
    t = tl.program_id(0)
    c_blk = tl.program_id(1)
    cs = c_blk * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    s1 = tl.zeros([BLOCK_C], dtype=ACC)
    s2 = tl.zeros([BLOCK_C], dtype=ACC)
    for tile in range(tiles):
        mine = tl.load(ids_ptr + tile // chunks) == t
        s1 += tl.where(mine, tl.load(s1_ptr + tile * C + cs, mask=c_ok, other=0.0), 0.0)
        s2 += tl.where(mine, tl.load(s2_ptr + tile * C + cs, mask=c_ok, other=0.0), 0.0)
    tl.store(out_s1_ptr + t * C + cs, s1, mask=c_ok)
    tl.store(out_s2_ptr + t * C + cs, s2, mask=c_ok)


@triton.jit
def _grad_input_kernel(x_ptr, dy_ptr, dx_ptr, ids_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, s1_ptr, s2_ptr,
                       cnt_ptr, C, S, stride_n, stride_c, stride_s, chunks, TRAINING: tl.constexpr,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr,
                       RELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    t, cs, c_ok, mask, k, offs = _task_tile(tile, tl.program_id(1), ids_ptr, C, S, stride_n, stride_c, stride_s,
                                            chunks, BLOCK_C, BLOCK_S)
    mean = tl.load(mean_ptr + k, mask=c_ok, other=0.0)
    r = tl.load(invstd_ptr + k, mask=c_ok, other=0.0)
    a, shift = _coefficients(w_ptr, b_ptr, k, c_ok, HAS_WEIGHT, HAS_BIAS, SIGMOID, ACC)
    # dx = a·r·(dy' − s1/m − x̂·s2x/m) with x̂ = (x − mean)·r and s2x = r·Σ dy'·(x − mean).
    coef_dy = a * r
    coef_d = tl.zeros([BLOCK_C], dtype=ACC)
    coef_0 = tl.zeros([BLOCK_C], dtype=ACC)
    if TRAINING:
        m = tl.maximum(tl.load(cnt_ptr + t), 1.0)
        s1 = tl.load(s1_ptr + k, mask=c_ok, other=0.0)
        s2 = tl.load(s2_ptr + k, mask=c_ok, other=0.0)
        coef_d = -coef_dy * r * r * s2 / m
        coef_0 = -coef_dy * s1 / m
    d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - mean[:, None]
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    if RELU:
        g = tl.where(d * (a * r)[:, None] + shift[:, None] > 0.0, g, 0.0)
    dx = coef_dy[:, None] * g + coef_d[:, None] * d + coef_0[:, None]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _task_of_samples(task_ids: Tensor | None, n: int, num_tasks: int, device) -> Tensor:
    if task_ids is not None:
        return task_ids.to(torch.int32)
    return (torch.arange(n, device=device, dtype=torch.int32) // max(n // num_tasks, 1))


_forced_tiles: dict | None = None


class tile_config:
    """Force the tile sizes of every launch inside the block (for sweeps: benchmarks/tune_triton.py)."""

    def __init__(self, block_c: int, block_s: int, num_warps: int = 4):
        self.config = {"block_c": block_c, "block_s": block_s, "num_warps": num_warps}

    def __enter__(self):
        global _forced_tiles
        self.previous, _forced_tiles = _forced_tiles, self.config

    def __exit__(self, *exc):
        global _forced_tiles
        _forced_tiles = self.previous


def _grid_shape(x: Tensor, training: bool):
    """(n, c, s, strides..., block_c, block_s, chunks, num_warps): a forced or swept tile configuration for x's
    shape (tsbn_kernels.tuning), else the heuristic of ``_blocks``."""
    n, c, s, sn, sc, ss = _view_ncs(x)
    block_c, block_s = _blocks(c, s, channels_fast=sc == 1 and c > 1)
    num_warps = 4
    tuned = _forced_tiles or tuning.triton_config("ts_batch_norm", x, training)
    if tuned:
        block_c, block_s, num_warps = int(tuned["block_c"]), int(tuned["block_s"]), int(tuned.get("num_warps", 4))
        for name, value in (("block_c", block_c), ("block_s", block_s), ("num_warps", num_warps)):
            if value < 1 or value & (value - 1):
                raise ValueError(f"Triton tile configuration {tuned}: {name} must be a power of two")
    chunks = triton.cdiv(s, block_s)
    return n, c, s, sn, sc, ss, block_c, block_s, chunks, num_warps


def _null(x: Tensor) -> Tensor:
    return x.new_empty((1,), dtype=torch.float32)


@torch.library.custom_op("tsbn::triton_bn_forward", mutates_args=())
def triton_bn_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                      running_var: Tensor | None, task_ids: Tensor | None, num_tasks: int, training: bool,
                      eps: float, sigmoid_gate: bool, relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Same contract as tsbn::ts_bn_forward: (y, mean, invstd, biased var, element count per task)."""
    x = _dense(x)
    n, c, s, sn, sc, ss, block_c, block_s, chunks, warps = _grid_shape(x, training)
    acc = accumulation_dtype(x.dtype)
    acc_tl = tl.float64 if acc == torch.float64 else tl.float32
    ids = _task_of_samples(task_ids, n, num_tasks, x.device)
    if training:
        tiles = n * chunks
        part_mean = x.new_empty((tiles, c), dtype=acc)
        part_m2 = torch.empty_like(part_mean)
        part_cnt = x.new_empty((tiles,), dtype=acc)
        _moments_kernel[(tiles, triton.cdiv(c, block_c))](x, part_mean, part_m2, part_cnt, c, s, sn, sc, ss, chunks,
                                                          BLOCK_C=block_c, BLOCK_S=block_s, ACC=acc_tl, num_warps=warps)
        mean = x.new_empty((num_tasks, c), dtype=acc)
        var, invstd = torch.empty_like(mean), torch.empty_like(mean)
        count = x.new_empty((num_tasks,), dtype=acc)
        merge_c = min(128, triton.next_power_of_2(c)) if not INTERPRET else 16
        _merge_moments_kernel[(num_tasks, triton.cdiv(c, merge_c))](
            part_mean, part_m2, part_cnt, ids, mean, var, invstd, count, c, tiles, chunks, eps, BLOCK_C=merge_c,
            ACC=acc_tl)
    else:
        mean = running_mean.to(acc, copy=True).contiguous()
        var = running_var.to(acc, copy=True).contiguous()
        invstd = torch.rsqrt(var + eps)
        count = x.new_zeros((num_tasks,), dtype=acc)
    y = torch.empty_like(x)
    if x.numel():
        _apply_kernel[(n * chunks, triton.cdiv(c, block_c))](
            x, y, ids, mean, invstd, weight.contiguous() if weight is not None else _null(x),
            bias.contiguous() if bias is not None else _null(x), c, s, sn, sc, ss, chunks,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SIGMOID=sigmoid_gate, RELU=relu,
            BLOCK_C=block_c, BLOCK_S=block_s, ACC=acc_tl, num_warps=warps)
    return y, mean, invstd, var, count


@triton_bn_forward.register_fake
def _(x, weight, bias, running_mean, running_var, task_ids, num_tasks, training, eps, sigmoid_gate, relu):
    acc = accumulation_dtype(x.dtype)
    stats = x.new_empty((num_tasks, x.shape[1]), dtype=acc)
    return (torch.empty_like(_dense(x)), stats, torch.empty_like(stats), torch.empty_like(stats),
            x.new_empty((num_tasks,), dtype=acc))


@torch.library.custom_op("tsbn::triton_bn_backward", mutates_args=())
def triton_bn_backward(grad_y: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                       invstd: Tensor, count: Tensor, task_ids: Tensor | None, num_tasks: int, training: bool,
                       sigmoid_gate: bool, relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias); the parameter gradients are empty when the parameter is absent."""
    x = _dense(x)
    dy = grad_y.to(x.dtype)
    dy = dy if dy.stride() == x.stride() else torch.empty_like(x).copy_(dy)
    n, c, s, sn, sc, ss, block_c, block_s, chunks, warps = _grid_shape(x, True)
    ids = _task_of_samples(task_ids, n, num_tasks, x.device)
    acc = accumulation_dtype(x.dtype)
    acc_tl = tl.float64 if acc == torch.float64 else tl.float32
    mean_acc, invstd_acc = mean.to(acc).contiguous(), invstd.to(acc).contiguous()
    tiles = n * chunks
    w_arg = weight.contiguous() if weight is not None else _null(x)
    b_arg = bias.contiguous() if bias is not None else _null(x)
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SIGMOID=sigmoid_gate, RELU=relu,
                 ACC=acc_tl)
    part_s1 = x.new_empty((tiles, c), dtype=acc)
    part_s2 = torch.empty_like(part_s1)
    _grad_sums_kernel[(tiles, triton.cdiv(c, block_c))](x, dy, ids, mean_acc, invstd_acc, w_arg, b_arg, part_s1, part_s2,
                                                        c, s, sn, sc, ss, chunks, BLOCK_C=block_c, BLOCK_S=block_s,
                                                        num_warps=warps, **flags)
    s1 = x.new_empty((num_tasks, c), dtype=acc)
    s2 = torch.empty_like(s1)
    merge_c = min(128, triton.next_power_of_2(c)) if not INTERPRET else 16
    _merge_sums_kernel[(num_tasks, triton.cdiv(c, merge_c))](part_s1, part_s2, ids, s1, s2, c, tiles, chunks,
                                                             BLOCK_C=merge_c, ACC=acc_tl)
    dx = torch.empty_like(x)
    _grad_input_kernel[(tiles, triton.cdiv(c, block_c))](
        x, dy, dx, ids, mean_acc, invstd_acc, w_arg, b_arg, s1, s2, count.to(acc).contiguous(), c, s, sn, sc,
        ss, chunks, TRAINING=training, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps, **flags)
    if weight is not None:
        s2x = s2 * invstd_acc
        if sigmoid_gate:
            gate = torch.sigmoid(weight.to(acc))
            s2x = s2x * gate * (1 - gate)
        grad_weight = s2x.to(weight.dtype)
    else:
        grad_weight = x.new_empty((0,))
    grad_bias = s1.to(bias.dtype) if bias is not None else x.new_empty((0,))
    return dx, grad_weight, grad_bias


@triton_bn_backward.register_fake
def _(grad_y, x, weight, bias, mean, invstd, count, task_ids, num_tasks, training, sigmoid_gate, relu):
    return (torch.empty_like(_dense(x)), torch.empty_like(weight) if weight is not None else x.new_empty((0,)),
            torch.empty_like(bias) if bias is not None else x.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _, task_ids, num_tasks, training, _, sigmoid_gate, relu = inputs
    _, mean, invstd, _, count = output
    ctx.save_for_backward(x, weight, bias, mean, invstd, count, task_ids)
    ctx.config = (num_tasks, training, sigmoid_gate, relu)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_y, *_):
    x, weight, bias, mean, invstd, count, task_ids = ctx.saved_tensors
    num_tasks, training, sigmoid_gate, relu = ctx.config
    dx, dw, db = triton_bn_backward(grad_y, x, weight, bias, mean, invstd, count, task_ids, num_tasks, training,
                                    sigmoid_gate, relu)
    return (dx if ctx.needs_input_grad[0] else None,
            dw if weight is not None and ctx.needs_input_grad[1] else None,
            db if bias is not None and ctx.needs_input_grad[2] else None) + (None,) * 8


triton_bn_forward.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("tsbn::triton_bn_update_running_stats", mutates_args=("running_mean", "running_var"))
def triton_bn_update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                                   count: Tensor, momentum: float, momentum_per_task: Tensor | None) -> None:
    """running ← (1 − f)·running + f·stat for present tasks, unbiased variance; a handful of [T, C] ops."""
    factor = (momentum_per_task.to(torch.float64) if momentum_per_task is not None
              else torch.full_like(count, momentum, dtype=torch.float64))
    count64 = count.to(torch.float64)
    factor = torch.where(count64 > 0, factor, torch.zeros_like(factor)).unsqueeze(1)
    unbiased = var.to(torch.float64) * (count64 / (count64 - 1).clamp_min(1)).unsqueeze(1)
    running_mean.copy_(running_mean.to(torch.float64).lerp(mean.to(torch.float64), factor))
    running_var.copy_(running_var.to(torch.float64).lerp(unbiased, factor))


@triton_bn_update_running_stats.register_fake
def _(running_mean, running_var, mean, var, count, momentum, momentum_per_task):
    return None


def ts_batch_norm(x: Tensor, weight, bias, running_mean, running_var, *, task_ids, num_tasks, training, momentum,
                  eps, gate, activation) -> Tensor:
    """The dispatch contract of ``tsbn_kernels.dispatch`` on the Triton kernels."""
    y, mean, _, var, count = triton_bn_forward(x, weight, bias, running_mean, running_var, task_ids, num_tasks,
                                               training, eps, gate == "sigmoid", activation == "relu")
    if training and running_mean is not None:
        per_task = momentum if isinstance(momentum, Tensor) else None
        triton_bn_update_running_stats(running_mean, running_var, mean, var, count,
                                       0.0 if per_task is not None else float(momentum), per_task)
    return y


dispatch.register("triton", "ts_batch_norm", ts_batch_norm, ("cuda",))
