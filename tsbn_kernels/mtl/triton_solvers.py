"""The weightings' quadratic solver (solvers.min_quadratic) as one Triton launch per call.

The tensor program runs ~3 kernels an iteration for a box and ~14 for the simplex, 500 iterations: on a GPU,
where each launch costs microseconds and the T×T arithmetic next to nothing, that is thousands of launches per
training step. Here one program per problem (row of ``start``) holds M in registers and runs the power
iteration and every FISTA step itself; the arithmetic is the tensor program's, step for step.

The simplex projection without a sort: solvers.project_simplex's threshold is the largest of its candidates θ_k
over the ratios in descending order, and every k is "the ratios ≥ ratio_i" for some i: a T×T comparison.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# One program keeps the T×T Gramian and the T×T comparison of the simplex projection in registers (sm_90, ptxas:
# no stack frame up to these; tests/triton_sm90.py). float64's simplex comparison spills past 32 tasks.
MAX_TASKS = 64
MAX_TASKS_FLOAT64_SIMPLEX = 32


@triton.jit
def _matvec(M, v):
    return tl.sum(M * v[None, :], axis=1)


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
    diag = tl.sum(tl.where(i[:, None] == i[None, :], M, 0.0), axis=1)
    # Jacobi scaling as solvers.jacobi_scale (padding: d = 1, which no result reads).
    d = tl.sqrt(tl.maximum(diag, 0.0))
    top = tl.max(d, axis=0)
    d = tl.where(ok, tl.where(top > 0, tl.maximum(d, 1e-6 * top), 1.0), 1.0)
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
