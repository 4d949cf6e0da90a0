"""Triton kernels for the Gramian and the combination of per-task gradients G [T, P] (DESIGN.md §3).

gramian: programs split P; each accumulates the [T, T] product of its columns and writes a partial, summed in
fixed order afterwards — one pass over G, deterministic. A few tasks: the outer product as broadcast multiply-
adds (T² FMAs per column, far under the memory rate). Many tasks: tl.dot in 3xTF32 (tensor cores, about fp32
accuracy), since plain fp32 FMAs at T ≥ 16 would make the pass compute-bound (a 64×64 tile costs ~100 FMAs per
loaded value, more than an H100's fp32 units deliver at full memory bandwidth).
combine: one program per column block computes wᵀG for its columns — one more pass, P writes.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..kernels.triton_utils import accumulation_types, target_programs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# From this many tasks on, the Gramian tile goes through tl.dot (whose operands need 16 rows).
DOT_MIN_TASKS = 9


@triton.jit
def _gramian_partial_kernel(g_ptr, part_ptr, T, P, stride_t, cols_per_program, BLOCK_T: tl.constexpr,
                            BLOCK_P: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr):
    pid = tl.program_id(0)
    ts = tl.arange(0, BLOCK_T)
    t_ok = ts < T
    acc = tl.zeros([BLOCK_T, BLOCK_T], dtype=ACC)
    start = pid * cols_per_program
    for offset in range(0, cols_per_program, BLOCK_P):
        ps = start + offset + tl.arange(0, BLOCK_P)
        mask = t_ok[:, None] & (ps < P)[None, :] & (ps < start + cols_per_program)[None, :]
        g = tl.load(g_ptr + ts[:, None].to(tl.int64) * stride_t + ps[None, :], mask=mask, other=0.0).to(ACC)
        if USE_DOT:
            acc += tl.dot(g, tl.trans(g), input_precision="tf32x3")
        else:
            acc += tl.sum(g[:, None, :] * g[None, :, :], axis=2)
    out = part_ptr + pid * BLOCK_T * BLOCK_T + ts[:, None] * BLOCK_T + ts[None, :]
    tl.store(out, acc)


@triton.jit
def _combine_kernel(g_ptr, w_ptr, out_ptr, T, P, stride_t, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
                    ACC: tl.constexpr):
    pid = tl.program_id(0)
    ts = tl.arange(0, BLOCK_T)
    ps = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    t_ok = ts < T
    mask = t_ok[:, None] & (ps < P)[None, :]
    g = tl.load(g_ptr + ts[:, None].to(tl.int64) * stride_t + ps[None, :], mask=mask, other=0.0).to(ACC)
    w = tl.load(w_ptr + ts, mask=t_ok, other=0.0).to(ACC)
    tl.store(out_ptr + ps, tl.sum(g * w[:, None], axis=0).to(out_ptr.dtype.element_ty), mask=ps < P)


def triton_gramian(G: Tensor) -> Tensor:
    G = G if G.stride(1) == 1 else G.contiguous()
    T, P = G.shape
    acc, acc_tl = accumulation_types(G.dtype)
    use_dot = T >= DOT_MIN_TASKS and G.dtype != torch.float64   # no 3xTF32 for float64
    block_t = max(16, triton.next_power_of_2(T)) if use_dot else triton.next_power_of_2(T)
    if INTERPRET:
        block_p = 32
    elif use_dot:
        block_p = max(16, min(64, 2048 // block_t))   # 3xTF32 splits each operand in two: keep it in registers
    else:   # the broadcast product holds block_t² · block_p values
        block_p = max(128, min(2048, 8192 // (block_t * block_t)))
    programs = max(1, min(target_programs(G.device, 4), triton.cdiv(P, block_p)))
    cols = triton.cdiv(triton.cdiv(P, programs), block_p) * block_p
    programs = triton.cdiv(P, cols)
    partials = torch.empty(programs, block_t, block_t, dtype=acc, device=G.device)
    _gramian_partial_kernel[(programs,)](G, partials, T, P, G.stride(0), cols, BLOCK_T=block_t, BLOCK_P=block_p,
                                         ACC=acc_tl, USE_DOT=use_dot)
    # Fixed-order sum of the partials (a reduction over a fixed dimension: deterministic).
    return partials.sum(dim=0)[:T, :T]


def triton_combine(G: Tensor, w: Tensor) -> Tensor:
    G = G if G.stride(1) == 1 else G.contiguous()
    T, P = G.shape
    acc, acc_tl = accumulation_types(G.dtype)
    block_t = triton.next_power_of_2(T)
    block_p = 64 if INTERPRET else max(128, min(2048, 16384 // block_t))
    out = torch.empty(P, dtype=G.dtype, device=G.device)
    _combine_kernel[(triton.cdiv(P, block_p),)](G, w.to(acc).contiguous(), out, T, P, G.stride(0), BLOCK_T=block_t,
                                                BLOCK_P=block_p, ACC=acc_tl)
    return out
