"""The weightings' solvers as one Triton launch per call: the quadratic solver (solvers.min_quadratic) and all of
cagrad (weightings.cagrad).

The tensor programs run ~3 kernels an iteration for a box and ~14 for the simplex, 500 iterations, and cagrad
~20 an iteration of solvers.minimize_on_simplex, 300 iterations: on a GPU, where each launch costs microseconds
and the T×T arithmetic next to nothing, that is thousands of launches per training step. Here one program per
problem (row of ``start``) holds M in registers and runs the power iteration and every FISTA step itself; the
arithmetic is the tensor program's, step for step. cagrad's one program also computes the mean weights, the
radius and the final w around its adaptive-step projected gradient (same steps, same accept rule).

The simplex projection without a sort: solvers.project_simplex's threshold is the largest of its candidates θ_k
over the ratios in descending order, and every k is "the ratios ≥ ratio_i" for some i: a T×T comparison. (The
prefixes that end inside a tie are not among them, but across a tie θ_k moves monotonically toward the tied ratio,
so the largest is at a tie's ends.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# One program keeps the T×T Gramian and the T×T comparison of the simplex projection in registers (sm_90, ptxas:
# no stack frame up to these; tests/triton_sm90.py). float64's simplex comparison spills past 32 tasks; cagrad's
# float64 program fits at T = 48 and 64 but not at the other T in 33..63 (a row stride of M that is not a multiple
# of 16 gets a layout with twice the registers per vector), so it keeps the same limit.
MAX_TASKS = 64
MAX_TASKS_FLOAT64_SIMPLEX = 32
MAX_TASKS_FLOAT64_CAGRAD = 32


@triton.jit
def _matvec(M, v):
    return tl.sum(M * v[None, :], axis=1)


@triton.jit
def _jacobi_scale(M, i, ok):
    """solvers.jacobi_scale (padding: d = 1, which no result reads)."""
    d = tl.sqrt(tl.maximum(tl.sum(tl.where(i[:, None] == i[None, :], M, 0.0), axis=1), 0.0))
    top = tl.max(d, axis=0)
    return tl.where(ok, tl.where(top > 0, tl.maximum(d, 1e-6 * top), 1.0), 1.0)


@triton.jit
def _project(u, inverse, lower, ok, SIMPLEX: tl.constexpr):
    """onto {u ≥ 0, Σ u·inverse = 1} (solvers.project_simplex with a = inverse), or onto the box {u ≥ lower}."""
    if SIMPLEX:
        ratio = tl.where(ok, u / inverse, float("-inf"))
        at_least = (ratio[None, :] >= ratio[:, None]) & ok[None, :]      # row i: the k with ratio_k ≥ ratio_i
        weighted = tl.sum(tl.where(at_least, (inverse * u)[None, :], 0.0), axis=1)
        squares = tl.sum(tl.where(at_least, (inverse * inverse)[None, :], 0.0), axis=1)
        theta = tl.max(tl.where(ok, (weighted - 1.0) / squares, float("-inf")), axis=0)
        return tl.where(ok, tl.maximum(u - theta * inverse, 0.0), 0.0)
    return tl.maximum(u, lower)


@triton.jit
def _min_quadratic_kernel(m_ptr, start_ptr, out_ptr, T, iterations, power_iterations, BLOCK_T: tl.constexpr,
                          SIMPLEX: tl.constexpr, TINY: tl.constexpr):
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK_T)
    ok = i < T
    M = tl.load(m_ptr + i[:, None] * T + i[None, :], mask=ok[:, None] & ok[None, :], other=0.0)
    start = tl.load(start_ptr + row * T + i, mask=ok, other=0.0)
    d = _jacobi_scale(M, i, ok)
    S = M / (d[:, None] * d[None, :])
    start = start * d
    inverse = 1.0 / d
    # λ_max as solvers.largest_eigenvalue: power iteration on S scaled to a unit diagonal maximum, started from the
    # column of the largest diagonal entry.
    sdiag = tl.where(ok, tl.sum(tl.where(i[:, None] == i[None, :], S, 0.0), axis=1), float("-inf"))
    scale = tl.maximum(tl.max(sdiag, axis=0), TINY)
    largest = tl.argmax(sdiag, axis=0)
    Ss = S / scale
    v = tl.sum(tl.where(i[None, :] == largest, Ss, 0.0), axis=1)
    v = v / tl.maximum(tl.sqrt(tl.sum(v * v, axis=0)), TINY)
    for _ in range(power_iterations):
        v = _matvec(Ss, v)
        v = v / tl.maximum(tl.sqrt(tl.sum(v * v, axis=0)), TINY)
    step = 1.0 / (tl.maximum(tl.sum(v * _matvec(Ss, v), axis=0), 1.0) * scale)
    # FISTA with Nesterov's momentum, as solvers.min_quadratic.
    x = _project(start, inverse, start, ok, SIMPLEX)
    y = x
    momentum = tl.full([], 1.0, M.dtype)
    for _ in range(iterations):
        x_next = _project(y - step * _matvec(S, y), inverse, start, ok, SIMPLEX)
        momentum_next = (1.0 + tl.sqrt(1.0 + 4.0 * momentum * momentum)) / 2.0
        y = x + (1.0 + (momentum - 1.0) / momentum_next) * (x_next - x)
        x = x_next
        momentum = momentum_next
    tl.store(out_ptr + row * T + i, x / d, mask=ok)


@triton.jit
def _cagrad_kernel(m_ptr, out_ptr, T, iterations, BLOCK_T: tl.constexpr, C: tl.constexpr, DIVISOR: tl.constexpr):
    i = tl.arange(0, BLOCK_T)
    ok = i < T
    M = tl.load(m_ptr + i[:, None] * T + i[None, :], mask=ok[:, None] & ok[None, :], other=0.0)
    # Constants made in M's dtype: a bare literal is a float32 constant, which in float64 would put 1e-8 off the
    # tensor program's in the last bits and c = 0.1 in its 8th digit.
    eps = tl.full([], 1e-8, M.dtype)
    b = tl.where(ok, tl.full([BLOCK_T], 1.0, M.dtype) / T, 0.0)
    radius = tl.full([], C, M.dtype) * tl.sqrt(tl.sum(tl.sum(M, axis=1), axis=0) / (T * T) + eps) + eps
    Mb = _matvec(M, b)
    # solvers.minimize_on_simplex on cagrad's objective x·Mb + radius·sqrt(xᵀMx + 1e-8), in the Jacobi-scaled
    # u = d·x over {u ≥ 0, Σ u/d = 1}. The gradient at x is carried from the step that accepted x, not recomputed
    # from x each step: one product with M a step.
    inverse = 1.0 / _jacobi_scale(M, i, ok)
    u = _project(b / inverse, inverse, b, ok, True)
    x = u * inverse
    Mx = _matvec(M, x)
    root = tl.sqrt(tl.sum(x * Mx, axis=0) + eps)
    value = tl.sum(x * Mb, axis=0) + radius * root
    gradient = (Mb + radius * Mx / root) * inverse
    step = 1.0 / tl.maximum(tl.max(tl.abs(gradient), axis=0), tl.full([], 1e-30, M.dtype))
    for _ in range(iterations):
        candidate = _project(u - step * gradient, inverse, u, ok, True)
        xc = candidate * inverse
        Mc = _matvec(M, xc)
        root = tl.sqrt(tl.sum(xc * Mc, axis=0) + eps)
        candidate_value = tl.sum(xc * Mb, axis=0) + radius * root
        better = candidate_value < value
        u = tl.where(better, candidate, u)
        x = tl.where(better, xc, x)
        gradient = tl.where(better, (Mb + radius * Mc / root) * inverse, gradient)
        value = tl.where(better, candidate_value, value)
        step = tl.where(better, step * 1.5, step * 0.5)
    gw_norm = tl.sqrt(tl.maximum(tl.sum(x * _matvec(M, x), axis=0), 0.0))
    w = (b + (radius / (gw_norm + eps)) * x) / tl.full([], DIVISOR, M.dtype)
    tl.store(out_ptr + i, w, mask=ok)


def applies(M: Tensor, simplex: bool) -> bool:
    """Whether the fused solver takes this problem: float32/float64 and few enough tasks for one program."""
    if M.dtype == torch.float64 and simplex:
        return M.shape[0] <= MAX_TASKS_FLOAT64_SIMPLEX
    return M.dtype in (torch.float32, torch.float64) and M.shape[0] <= MAX_TASKS


def _warps(block_t: int, dtype: torch.dtype) -> int:
    # Enough threads that M, the iterate and the simplex comparison stay in registers.
    values_per_warp = block_t * block_t * (2 if dtype == torch.float64 else 1) // 32
    return 4 if values_per_warp <= 64 else 8 if values_per_warp <= 128 else 16


def min_quadratic(M: Tensor, start: Tensor, simplex: bool, iterations: int, power_iterations: int) -> Tensor:
    """solvers.min_quadratic in one launch: one program per row of ``start`` [B, T]."""
    T = M.shape[0]
    M = M.contiguous()
    start = start.to(M.dtype).contiguous()
    out = torch.empty_like(start)
    block_t = max(2, triton.next_power_of_2(T))
    # TINY a constant, not an argument: Triton passes float arguments as float32, where float64's is 0.
    _min_quadratic_kernel[(start.shape[0],)](M, start, out, T, iterations, power_iterations, BLOCK_T=block_t,
                                             SIMPLEX=simplex, TINY=torch.finfo(M.dtype).tiny,
                                             num_warps=_warps(block_t, M.dtype))
    return out


def cagrad_applies(M: Tensor) -> bool:
    """Whether the fused cagrad takes this Gramian: float32 up to MAX_TASKS tasks, float64 up to
    MAX_TASKS_FLOAT64_CAGRAD."""
    limit = MAX_TASKS_FLOAT64_CAGRAD if M.dtype == torch.float64 else MAX_TASKS
    return M.dtype in (torch.float32, torch.float64) and M.shape[0] <= limit


def cagrad(M: Tensor, c: float, rescale: bool, iterations: int) -> Tensor:
    """weightings.cagrad in one launch: the mean weights, radius, the whole simplex solve and the final w."""
    T = M.shape[0]
    M = M.contiguous()
    out = torch.empty(T, dtype=M.dtype, device=M.device)
    block_t = max(2, triton.next_power_of_2(T))
    # c and 1 + c² as constants (one compile per c, which a run keeps): a float argument would arrive as float32.
    _cagrad_kernel[(1,)](M, out, T, iterations, BLOCK_T=block_t, C=float(c),
                         DIVISOR=float(1 + c * c) if rescale else 1.0,
                         num_warps=_warps(block_t, M.dtype))
    return out
