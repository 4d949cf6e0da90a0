"""Backend "triton": task-specific (sigmoid) batch norm as Triton kernels.

The input is viewed as [N, C, S] with its own strides, so NCHW and channels-last run without copies. Work is
split into programs of (one sample, a span of S, a block of C): every program belongs to exactly one task,
which makes the split independent of the task layout, and there are about eight programs per SM whatever T·C
is (DESIGN.md §4: never a grid of only T·C programs). Each program walks its span in tiles, accumulating
pivot-shifted sums per lane (exact when |mean| >> std), and writes one partial row; the merge kernel combines
the few partial rows of each (task, channel) in row order, in float64, with the parallel form of Chan's
formula — no float atomics, so results are deterministic. The apply kernels fold gate, affine, mean and rstd
into per-(task, channel) coefficients held in registers for the whole span and run programs and tiles in the
reverse order of the statistics pass, so their first reads hit what that pass left in L2; the backward
recomputes the relu mask from x instead of storing it.

The cross-process path (tsbn_kernels.sync_batch_norm) runs the same passes one at a time, with collectives on
the [T, C] tables in between: each pass has one launcher here, which the single-process ops call too, so a rank
alone computes the bits of the single-process forward and backward.

Tile sizes come from a table swept offline per device (tsbn_kernels.tuning, benchmarks/tune_triton.py), keyed by
the nearest benchmarked shape, not from triton.autotune: a choice by timing at run time could pick another cut on
the next run, and another cut rounds differently — results would no longer be bitwise reproducible.

Registered with torch.library.custom_op (opaque to torch.compile, with fake impls and autograd) rather than
triton_op: triton_op's tracing into the kernel fails under TRITON_INTERPRET=1, which the CPU test suite uses.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import dispatch, tuning
from ..reference import accumulation_dtype, affine_grads_from_sums
from ..sync_batch_norm import SyncKernels, register_sync_kernels
from . import double_backward
from .triton_utils import accumulation_types, target_programs, task_of_samples

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Partial rows the merge kernel reads per step.
MERGE_ROWS = 8 if INTERPRET else 32


def _view_ncs(x: Tensor) -> tuple[int, int, int, int, int, int]:
    """(N, C, S, stride_n, stride_c, stride_s) of x seen as [N, C, S]; needs S dims mergeable."""
    n, c = x.shape[0], x.shape[1]
    s = x[0, 0].numel() if n and c else 0
    if x.dim() == 2:
        return n, c, 1, x.stride(0), x.stride(1), 1
    spatial_strides = x.stride()[2:]
    return n, c, s, x.stride(0), x.stride(1), spatial_strides[-1] if s > 1 else 1


def _dense(x: Tensor) -> Tensor:
    """x if its spatial dims merge into one strided dim (NCHW, channels-last, the channel-minor [N, C, L] of a
    transposed sequence, ...), else a contiguous copy; empty_like of it gives outputs in the same layout."""
    if x.dim() <= 3:
        dense = x.dim() == 2 or x.stride(2) == 1 or x.shape[2] == 1 or x.transpose(1, 2).is_contiguous()
        return x if dense else x.contiguous()
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last if x.dim() == 4
                                            else torch.channels_last_3d):
        return x
    return x.contiguous()


def _blocks(c: int, s: int, channels_fast: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S) of one tile: about 2K elements, the contiguous dim along the tile's long side so
    loads coalesce into 16-byte vectors. The interpreter interprets every tile of every program, so the CPU
    tests keep one tile per program by default (tests/test_triton_split.py forces the other cuts)."""
    if INTERPRET:
        return 16, 32
    if channels_fast:
        block_c = min(128, triton.next_power_of_2(c))
        return block_c, max(1, min(triton.next_power_of_2(s), 2048 // block_c))
    block_s = min(1024, max(16, triton.next_power_of_2(s)))
    return min(triton.next_power_of_2(c), max(1, 2048 // block_s)), block_s


@dataclass(frozen=True)
class Grid:
    """How one pass over x [N, C, S] is cut: programs of (sample, split of S, channel block), each walking
    ``iters`` tiles of BLOCK_C × BLOCK_S; partial rows are indexed by tile = sample · splits + split."""
    n: int
    c: int
    s: int
    stride_n: int
    stride_c: int
    stride_s: int
    block_c: int
    block_s: int
    num_warps: int
    splits: int
    iters: int

    @property
    def c_blocks(self) -> int:
        return triton.cdiv(self.c, self.block_c)

    @property
    def tiles(self) -> int:
        return self.n * self.splits

    @property
    def programs(self) -> int:
        return self.tiles * self.c_blocks

    def args(self) -> tuple[int, ...]:
        return (self.c, self.s, self.stride_n, self.stride_c, self.stride_s, self.splits, self.iters, self.tiles)


_forced_tiles: dict | None = None


class tile_config:
    """Force the tile sizes of every launch inside the block (for sweeps: benchmarks/tune_triton.py)."""

    def __init__(self, block_c: int, block_s: int, num_warps: int = 4, programs: int | None = None):
        self.config = {"block_c": block_c, "block_s": block_s, "num_warps": num_warps}
        if programs is not None:
            self.config["programs"] = programs

    def __enter__(self):
        global _forced_tiles
        self.previous, _forced_tiles = _forced_tiles, self.config

    def __exit__(self, *exc):
        global _forced_tiles
        _forced_tiles = self.previous


def grid_for(x: Tensor, training: bool) -> Grid:
    """The cut of x: a forced or swept tile configuration for x's shape (tsbn_kernels.tuning), else the
    heuristic of ``_blocks``; the split of S makes about ``target_programs`` programs."""
    n, c, s, sn, sc, ss = _view_ncs(x)
    block_c, block_s = _blocks(c, s, channels_fast=sc == 1 and c > 1)
    num_warps = 4
    target = target_programs(x.device)
    tuned = _forced_tiles or tuning.triton_config("ts_batch_norm", x, training)
    if tuned:
        block_c, block_s, num_warps = int(tuned["block_c"]), int(tuned["block_s"]), int(tuned.get("num_warps", 4))
        target = int(tuned.get("programs", target))
        for name, value in (("block_c", block_c), ("block_s", block_s), ("num_warps", num_warps)):
            if value < 1 or value & (value - 1):
                raise ValueError(f"Triton tile configuration {tuned}: {name} must be a power of two")
    chunks = max(1, triton.cdiv(s, block_s))
    splits = min(chunks, max(1, triton.cdiv(target, max(1, n * triton.cdiv(c, block_c)))))
    iters = triton.cdiv(chunks, splits)
    return Grid(n, c, s, sn, sc, ss, block_c, block_s, num_warps, triton.cdiv(chunks, iters), iters)


@triton.jit
def _program_coords(pid, ids_ptr, C, splits, iters, tiles, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program pid's sample n, task t, first position of its span, channels and their (task, channel) index."""
    c_blk = pid // tiles
    tile = pid % tiles
    n = tile // splits
    s_start = (tile % splits) * iters * BLOCK_S
    t = tl.load(ids_ptr + n)
    cs = c_blk * BLOCK_C + tl.arange(0, BLOCK_C)
    return tile, n, t, s_start, cs, cs < C, t * C + cs


@triton.jit
def _tile(n, cs, c_ok, s0, S, stride_n, stride_c, stride_s, BLOCK_S: tl.constexpr):
    """Offsets and mask of the BLOCK_C × BLOCK_S tile of sample n starting at position s0."""
    ss = s0 + tl.arange(0, BLOCK_S)
    mask = c_ok[:, None] & (ss < S)[None, :]
    offs = n.to(tl.int64) * stride_n + cs[:, None].to(tl.int64) * stride_c + ss[None, :].to(tl.int64) * stride_s
    return offs, mask


@triton.jit
def _moments_kernel(x_ptr, ids_ptr, mean_ptr, m2_ptr, C, S, stride_n, stride_c, stride_s, splits, iters, tiles,
                    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    tile, n, _, s_start, cs, c_ok, _ = _program_coords(tl.program_id(0), ids_ptr, C, splits, iters, tiles,
                                                       BLOCK_C, BLOCK_S)
    # Shifted by the span's first value per channel: per-lane sums of (x − pivot) and its square stay small,
    # so the partial variance is exact even when |mean| >> std.
    first = n.to(tl.int64) * stride_n + cs.to(tl.int64) * stride_c + s_start.to(tl.int64) * stride_s
    pivot = tl.load(x_ptr + first, mask=c_ok, other=0.0).to(ACC)
    sum1 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    sum2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    for i in range(iters):
        offs, mask = _tile(n, cs, c_ok, s_start + i * BLOCK_S, S, stride_n, stride_c, stride_s, BLOCK_S)
        d = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - pivot[:, None], 0.0)
        sum1 += d
        sum2 += d * d
    count = tl.minimum(iters * BLOCK_S, S - s_start).to(ACC)
    s1 = tl.sum(sum1, axis=1)
    s2 = tl.sum(sum2, axis=1)
    tl.store(mean_ptr + tile * C + cs, pivot + s1 / count, mask=c_ok)
    tl.store(m2_ptr + tile * C + cs, tl.maximum(s2 - s1 * (s1 / count), 0.0), mask=c_ok)


@triton.jit
def _partial_rows(ids_ptr, t, r0, C, S, splits, iters, tiles, cs, c_ok, BLOCK_R: tl.constexpr,
                  BLOCK_S: tl.constexpr):
    """Rows r0 .. r0 + BLOCK_R of the partials: which belong to task t, their element counts (float64, 0 for
    other tasks), the [BLOCK_R, BLOCK_C] mask and offsets."""
    rows = r0 + tl.arange(0, BLOCK_R)
    r_ok = rows < tiles
    mine = r_ok & (tl.load(ids_ptr + rows // splits, mask=r_ok, other=-1) == t)
    span = iters * BLOCK_S
    counts = tl.where(mine, tl.minimum(span, S - (rows % splits) * span), 0).to(tl.float64)
    return counts, mine[:, None] & c_ok[None, :], rows[:, None] * C + cs[None, :]


@triton.jit
def _merge_moments_kernel(mean_ptr, m2_ptr, ids_ptr, out_mean_ptr, out_var_ptr, out_invstd_ptr, out_cnt_ptr, C, S,
                          splits, iters, tiles, eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    t = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    # Float64 whatever the input: only [tiles, C] values pass through here, and a running mean with
    # |mean| >> std would otherwise lose digits with every merged row.
    n_acc = tl.zeros([BLOCK_C], dtype=tl.float64)
    mean = tl.zeros([BLOCK_C], dtype=tl.float64)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for r0 in range(0, tiles, BLOCK_R):
        counts, mask, offs = _partial_rows(ids_ptr, t, r0, C, S, splits, iters, tiles, cs, c_ok, BLOCK_R, BLOCK_S)
        mb = tl.load(mean_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        qb = tl.load(m2_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        # The step's rows combined about their own mean, then merged into the running (count, mean, M2).
        n_b = tl.sum(counts, axis=0)
        mean_b = tl.sum(counts[:, None] * mb, axis=0) / tl.maximum(n_b, 1.0)
        dev = tl.where(mask, mb - mean_b[None, :], 0.0)
        m2_b = tl.sum(qb + counts[:, None] * dev * dev, axis=0)
        total = n_acc + n_b
        safe = tl.maximum(total, 1.0)
        delta = mean_b - mean
        mean = mean + delta * (n_b / safe)
        m2 = m2 + m2_b + delta * delta * (n_acc * n_b / safe)
        n_acc = total
    var = m2 / tl.maximum(n_acc, 1.0)
    tl.store(out_mean_ptr + t * C + cs, mean.to(ACC), mask=c_ok)
    tl.store(out_var_ptr + t * C + cs, var.to(ACC), mask=c_ok)
    tl.store(out_invstd_ptr + t * C + cs, (1.0 / tl.sqrt(var + eps)).to(ACC), mask=c_ok)
    if tl.program_id(1) == 0:
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
def _apply_kernel(x_ptr, y_ptr, ids_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, C, S, stride_n, stride_c, stride_s,
                  splits, iters, tiles, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr,
                  RELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    # Reverse program and tile order: the tiles the statistics pass read last are still in L2.
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    _, n, _, s_start, cs, c_ok, k = _program_coords(pid, ids_ptr, C, splits, iters, tiles, BLOCK_C, BLOCK_S)
    mean = tl.load(mean_ptr + k, mask=c_ok, other=0.0)
    a, shift = _coefficients(w_ptr, b_ptr, k, c_ok, HAS_WEIGHT, HAS_BIAS, SIGMOID, ACC)
    scale = a * tl.load(invstd_ptr + k, mask=c_ok, other=0.0)
    for i in range(iters):
        offs, mask = _tile(n, cs, c_ok, s_start + (iters - 1 - i) * BLOCK_S, S, stride_n, stride_c,
                           stride_s, BLOCK_S)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        y = (x - mean[:, None]) * scale[:, None] + shift[:, None]
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sums_kernel(x_ptr, dy_ptr, ids_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, s1_ptr, s2_ptr, C, S,
                      stride_n, stride_c, stride_s, splits, iters, tiles, HAS_WEIGHT: tl.constexpr,
                      HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr, RELU: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    tile, n, _, s_start, cs, c_ok, k = _program_coords(tl.program_id(0), ids_ptr, C, splits, iters, tiles,
                                                       BLOCK_C, BLOCK_S)
    mean = tl.load(mean_ptr + k, mask=c_ok, other=0.0)
    a, shift = _coefficients(w_ptr, b_ptr, k, c_ok, HAS_WEIGHT, HAS_BIAS, SIGMOID, ACC)
    scale = a * tl.load(invstd_ptr + k, mask=c_ok, other=0.0)
    sum1 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    sum2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    for i in range(iters):
        offs, mask = _tile(n, cs, c_ok, s_start + i * BLOCK_S, S, stride_n, stride_c, stride_s, BLOCK_S)
        d = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - mean[:, None], 0.0)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        if RELU:
            g = tl.where(d * scale[:, None] + shift[:, None] > 0.0, g, 0.0)
        g = tl.where(mask, g, 0.0)
        sum1 += g
        sum2 += g * d
    tl.store(s1_ptr + tile * C + cs, tl.sum(sum1, axis=1), mask=c_ok)
    tl.store(s2_ptr + tile * C + cs, tl.sum(sum2, axis=1), mask=c_ok)


@triton.jit
def _merge_sums_kernel(s1_ptr, s2_ptr, ids_ptr, out_s1_ptr, out_s2_ptr, C, S, splits, iters, tiles,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    t = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    s1 = tl.zeros([BLOCK_C], dtype=tl.float64)
    s2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for r0 in range(0, tiles, BLOCK_R):
        _, mask, offs = _partial_rows(ids_ptr, t, r0, C, S, splits, iters, tiles, cs, c_ok, BLOCK_R, BLOCK_S)
        s1 += tl.sum(tl.load(s1_ptr + offs, mask=mask, other=0.0).to(tl.float64), axis=0)
        s2 += tl.sum(tl.load(s2_ptr + offs, mask=mask, other=0.0).to(tl.float64), axis=0)
    tl.store(out_s1_ptr + t * C + cs, s1.to(ACC), mask=c_ok)
    tl.store(out_s2_ptr + t * C + cs, s2.to(ACC), mask=c_ok)


@triton.jit
def _grad_input_kernel(x_ptr, dy_ptr, dx_ptr, ids_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, s1_ptr, s2_ptr,
                       cnt_ptr, C, S, stride_n, stride_c, stride_s, splits, iters, tiles, TRAINING: tl.constexpr,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr,
                       RELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    _, n, t, s_start, cs, c_ok, k = _program_coords(pid, ids_ptr, C, splits, iters, tiles, BLOCK_C, BLOCK_S)
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
    for i in range(iters):
        offs, mask = _tile(n, cs, c_ok, s_start + (iters - 1 - i) * BLOCK_S, S, stride_n, stride_c,
                           stride_s, BLOCK_S)
        d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - mean[:, None]
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        if RELU:
            g = tl.where(d * coef_dy[:, None] + shift[:, None] > 0.0, g, 0.0)
        dx = coef_dy[:, None] * g + coef_d[:, None] * d + coef_0[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _null(x: Tensor) -> Tensor:
    return x.new_empty((1,), dtype=torch.float32)


def _merge_block_c(c: int) -> int:
    return 16 if INTERPRET else min(64, triton.next_power_of_2(c))


def _training_stats(x: Tensor, ids: Tensor, grid: Grid, num_tasks: int, eps: float
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, invstd, biased var, count) of every task in x (dense, cut by ``grid``): the statistics pass and
    its merge, shared by the forward and the sync path's local statistics."""
    acc, acc_tl = accumulation_types(x.dtype)
    part_mean = x.new_empty((grid.tiles, grid.c), dtype=acc)
    part_m2 = torch.empty_like(part_mean)
    _moments_kernel[(grid.programs,)](x, ids, part_mean, part_m2, *grid.args(), BLOCK_C=grid.block_c,
                                      BLOCK_S=grid.block_s, ACC=acc_tl, num_warps=grid.num_warps)
    mean = x.new_empty((num_tasks, grid.c), dtype=acc)
    var, invstd = torch.empty_like(mean), torch.empty_like(mean)
    count = x.new_empty((num_tasks,), dtype=acc)
    merge_c = _merge_block_c(grid.c)
    _merge_moments_kernel[(num_tasks, triton.cdiv(grid.c, merge_c))](
        part_mean, part_m2, ids, mean, var, invstd, count, grid.c, grid.s, grid.splits, grid.iters, grid.tiles,
        eps, BLOCK_R=MERGE_ROWS, BLOCK_C=merge_c, BLOCK_S=grid.block_s, ACC=acc_tl)
    return mean, invstd, var, count


@torch.library.custom_op("tsbn::triton_bn_forward", mutates_args=())
def triton_bn_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                      running_var: Tensor | None, task_ids: Tensor | None, num_tasks: int, training: bool,
                      eps: float, sigmoid_gate: bool, relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Same contract as tsbn::ts_bn_forward: (y, mean, invstd, biased var, element count per task)."""
    x = _dense(x)
    grid = grid_for(x, training)
    acc, acc_tl = accumulation_types(x.dtype)
    ids = task_of_samples(task_ids, grid.n, num_tasks, x.device)
    if training:
        mean, invstd, var, count = _training_stats(x, ids, grid, num_tasks, eps)
    else:
        mean = running_mean.to(acc, copy=True).contiguous()
        var = running_var.to(acc, copy=True).contiguous()
        invstd = torch.rsqrt(var + eps)
        count = x.new_zeros((num_tasks,), dtype=acc)
    y = torch.empty_like(x)
    if x.numel():
        _apply_kernel[(grid.programs,)](
            x, y, ids, mean, invstd, weight.contiguous() if weight is not None else _null(x),
            bias.contiguous() if bias is not None else _null(x), *grid.args(),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SIGMOID=sigmoid_gate, RELU=relu,
            BLOCK_C=grid.block_c, BLOCK_S=grid.block_s, ACC=acc_tl, num_warps=grid.num_warps)
    return y, mean, invstd, var, count


@triton_bn_forward.register_fake
def _(x, weight, bias, running_mean, running_var, task_ids, num_tasks, training, eps, sigmoid_gate, relu):
    acc = accumulation_dtype(x.dtype)
    stats = x.new_empty((num_tasks, x.shape[1]), dtype=acc)
    return (torch.empty_like(_dense(x)), stats, torch.empty_like(stats), torch.empty_like(stats),
            x.new_empty((num_tasks,), dtype=acc))


@dataclass(frozen=True)
class _BackwardPass:
    """What the two backward passes over x share: x and dy in one layout (so one set of strides serves both),
    the cut, the task of every sample, the statistics in the accumulation dtype and the kernel arguments of the
    affine."""
    x: Tensor
    dy: Tensor
    grid: Grid
    ids: Tensor
    acc: torch.dtype
    mean: Tensor
    invstd: Tensor
    weight: Tensor
    bias: Tensor
    flags: dict


def _backward_pass(grad_y: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                   invstd: Tensor, task_ids: Tensor | None, num_tasks: int, sigmoid_gate: bool,
                   relu: bool) -> _BackwardPass:
    x = _dense(x)
    dy = grad_y.to(x.dtype)
    dy = dy if dy.stride() == x.stride() else torch.empty_like(x).copy_(dy)
    grid = grid_for(x, True)
    acc, acc_tl = accumulation_types(x.dtype)
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SIGMOID=sigmoid_gate, RELU=relu,
                 ACC=acc_tl, BLOCK_C=grid.block_c, BLOCK_S=grid.block_s)
    return _BackwardPass(x, dy, grid, task_of_samples(task_ids, grid.n, num_tasks, x.device), acc,
                         mean.to(acc).contiguous(), invstd.to(acc).contiguous(),
                         weight.contiguous() if weight is not None else _null(x),
                         bias.contiguous() if bias is not None else _null(x), flags)


def _grad_sums(p: _BackwardPass, num_tasks: int) -> tuple[Tensor, Tensor]:
    """(Σ dy', Σ dy'·(x − mean)) [T, C] of the samples in p: the gradient-sums pass and its merge."""
    grid = p.grid
    part_s1 = p.x.new_empty((grid.tiles, grid.c), dtype=p.acc)
    part_s2 = torch.empty_like(part_s1)
    s1 = p.x.new_zeros((num_tasks, grid.c), dtype=p.acc)
    s2 = torch.zeros_like(s1)
    if p.x.numel():
        _grad_sums_kernel[(grid.programs,)](p.x, p.dy, p.ids, p.mean, p.invstd, p.weight, p.bias, part_s1, part_s2,
                                            *grid.args(), num_warps=grid.num_warps, **p.flags)
        merge_c = _merge_block_c(grid.c)
        _merge_sums_kernel[(num_tasks, triton.cdiv(grid.c, merge_c))](
            part_s1, part_s2, p.ids, s1, s2, grid.c, grid.s, grid.splits, grid.iters, grid.tiles, BLOCK_R=MERGE_ROWS,
            BLOCK_C=merge_c, BLOCK_S=grid.block_s, ACC=p.flags["ACC"])
    return s1, s2


def _grad_input(p: _BackwardPass, s1: Tensor, s2: Tensor, count: Tensor, training: bool) -> Tensor:
    """dx from dy' and the sums s1, s2 over ``count`` elements per task (unused in eval, where the statistics
    are constants)."""
    dx = torch.empty_like(p.x)
    if p.x.numel():
        _grad_input_kernel[(p.grid.programs,)](
            p.x, p.dy, dx, p.ids, p.mean, p.invstd, p.weight, p.bias, s1.to(p.acc).contiguous(),
            s2.to(p.acc).contiguous(), count.to(p.acc).contiguous(), *p.grid.args(), TRAINING=training,
            num_warps=p.grid.num_warps, **p.flags)
    return dx


@torch.library.custom_op("tsbn::triton_bn_backward", mutates_args=())
def triton_bn_backward(grad_y: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                       invstd: Tensor, count: Tensor, task_ids: Tensor | None, num_tasks: int, training: bool,
                       sigmoid_gate: bool, relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias); the parameter gradients are empty when the parameter is absent."""
    p = _backward_pass(grad_y, x, weight, bias, mean, invstd, task_ids, num_tasks, sigmoid_gate, relu)
    s1, s2 = _grad_sums(p, num_tasks)
    dx = _grad_input(p, s1, s2, count, training)
    grad_weight, grad_bias = affine_grads_from_sums(s1, s2, p.invstd, weight, bias, sigmoid_gate)
    return (dx, x.new_empty((0,)) if grad_weight is None else grad_weight,
            x.new_empty((0,)) if grad_bias is None else grad_bias)


@triton_bn_backward.register_fake
def _(grad_y, x, weight, bias, mean, invstd, count, task_ids, num_tasks, training, sigmoid_gate, relu):
    return (torch.empty_like(_dense(x)), torch.empty_like(weight) if weight is not None else x.new_empty((0,)),
            torch.empty_like(bias) if bias is not None else x.new_empty((0,)))


def _check_tables(x: Tensor, num_tasks: int, **tables: Tensor | None) -> None:
    """The kernels index [T, C] tables by t·C + c and counts by t without bounds: a table of another shape would
    be read out of bounds silently, so the sync ops refuse it."""
    for name, table in tables.items():
        want = (num_tasks,) if name == "count" else (num_tasks, x.shape[1])
        if table is not None and tuple(table.shape) != want:
            raise ValueError(f"{name} must have shape {list(want)} (num_tasks={num_tasks}, channels={x.shape[1]}), "
                             f"got {list(table.shape)}")


@torch.library.custom_op("tsbn::triton_bn_batch_stats", mutates_args=())
def triton_bn_batch_stats(x: Tensor, task_ids: Tensor | None, num_tasks: int) -> tuple[Tensor, Tensor, Tensor]:
    """(mean [T, C], biased var [T, C], element count [T]) of x's samples, in the accumulation dtype: the local
    statistics of the sync path (an absent task: 0, 0, 0)."""
    x = _dense(x)
    acc = accumulation_dtype(x.dtype)
    if not x.numel():
        mean = x.new_zeros((num_tasks, x.shape[1]), dtype=acc)
        return mean, torch.zeros_like(mean), x.new_zeros((num_tasks,), dtype=acc)
    grid = grid_for(x, True)
    # eps only enters the invstd, which the sync path recomputes from the merged variance of all ranks.
    mean, _, var, count = _training_stats(x, task_of_samples(task_ids, grid.n, num_tasks, x.device), grid,
                                          num_tasks, 1.0)
    return mean, var, count


@triton_bn_batch_stats.register_fake
def _(x, task_ids, num_tasks):
    stats = x.new_empty((num_tasks, x.shape[1]), dtype=accumulation_dtype(x.dtype))
    return stats, torch.empty_like(stats), x.new_empty((num_tasks,), dtype=stats.dtype)


@torch.library.custom_op("tsbn::triton_bn_backward_reduce", mutates_args=())
def triton_bn_backward_reduce(grad_y: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                              invstd: Tensor, task_ids: Tensor | None, num_tasks: int, sigmoid_gate: bool,
                              relu: bool) -> tuple[Tensor, Tensor]:
    """(Σ dy', Σ dy'·(x − mean)) [T, C] over x's samples, in the accumulation dtype: what the sync path
    all-reduces before dx."""
    _check_tables(x, num_tasks, weight=weight, bias=bias, mean=mean, invstd=invstd)
    p = _backward_pass(grad_y, x, weight, bias, mean, invstd, task_ids, num_tasks, sigmoid_gate, relu)
    return _grad_sums(p, num_tasks)


@triton_bn_backward_reduce.register_fake
def _(grad_y, x, weight, bias, mean, invstd, task_ids, num_tasks, sigmoid_gate, relu):
    _check_tables(x, num_tasks, weight=weight, bias=bias, mean=mean, invstd=invstd)
    sums = x.new_empty((num_tasks, x.shape[1]), dtype=accumulation_dtype(x.dtype))
    return sums, torch.empty_like(sums)


@torch.library.custom_op("tsbn::triton_bn_backward_elemt", mutates_args=())
def triton_bn_backward_elemt(grad_y: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                             invstd: Tensor, sum_dy: Tensor, sum_dy_xmu: Tensor, count: Tensor,
                             task_ids: Tensor | None, num_tasks: int, sigmoid_gate: bool, relu: bool) -> Tensor:
    """Training-mode dx of x's samples from the sums and element counts of every rank (any float dtype; used in
    the accumulation dtype)."""
    _check_tables(x, num_tasks, weight=weight, bias=bias, mean=mean, invstd=invstd, sum_dy=sum_dy,
                  sum_dy_xmu=sum_dy_xmu, count=count)
    p = _backward_pass(grad_y, x, weight, bias, mean, invstd, task_ids, num_tasks, sigmoid_gate, relu)
    return _grad_input(p, sum_dy, sum_dy_xmu, count, True)


@triton_bn_backward_elemt.register_fake
def _(grad_y, x, weight, bias, mean, invstd, sum_dy, sum_dy_xmu, count, task_ids, num_tasks, sigmoid_gate, relu):
    _check_tables(x, num_tasks, weight=weight, bias=bias, mean=mean, invstd=invstd, sum_dy=sum_dy,
                  sum_dy_xmu=sum_dy_xmu, count=count)
    return torch.empty_like(_dense(x))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _, task_ids, num_tasks, training, eps, sigmoid_gate, relu = inputs
    _, mean, invstd, _, count = output
    ctx.save_for_backward(x, weight, bias, mean, invstd, count, task_ids)
    ctx.config = dict(num_tasks=num_tasks, training=training, eps=eps, sigmoid_gate=sigmoid_gate, relu=relu)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_y, *_):
    x, weight, bias, mean, invstd, count, task_ids = ctx.saved_tensors
    if double_backward.records_graph(grad_y, x, weight, bias):
        return double_backward.batch_norm_grads(grad_y, x, weight, bias, mean, invstd, task_ids, **ctx.config,
                                                needs_input_grad=ctx.needs_input_grad[:3]) + (None,) * 8
    config = ctx.config
    dx, dw, db = triton_bn_backward(grad_y, x, weight, bias, mean, invstd, count, task_ids, config["num_tasks"],
                                    config["training"], config["sigmoid_gate"], config["relu"])
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


def _sync_apply(x: Tensor, weight, bias, mean: Tensor, var: Tensor, task_ids, num_tasks: int, eps: float,
                sigmoid_gate: bool, relu: bool) -> Tensor:
    """y with the given (global) statistics: the eval-mode forward, whose running statistics they are."""
    return triton_bn_forward(x, weight, bias, mean, var, task_ids, num_tasks, False, eps, sigmoid_gate, relu)[0]


dispatch.register("triton", "ts_batch_norm", ts_batch_norm, ("cuda",))
register_sync_kernels("triton", SyncKernels(stats=triton_bn_batch_stats, apply=_sync_apply,
                                            reduce=triton_bn_backward_reduce, elemt=triton_bn_backward_elemt),
                      ("cuda",))
