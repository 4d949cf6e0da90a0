"""Small convex solvers on a T×T Gramian, written as fixed-iteration tensor programs.

No .item(), no data-dependent Python branch: every step is a tensor op on the Gramian's device, so an
aggregation step can be captured in a CUDA graph. Iteration counts are set for T up to ~64; the tests check
them against scipy in float64.
"""
from __future__ import annotations

import torch
from torch import Tensor


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of v onto the probability simplex (sort-based, Duchi et al. 2008)."""
    n = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    cumulative = u.cumsum(dim=-1) - 1
    k = torch.arange(1, n + 1, device=v.device, dtype=v.dtype)
    support = (u - cumulative / k > 0).sum(dim=-1, keepdim=True).clamp_min(1)
    theta = cumulative.gather(-1, support - 1) / support.to(v.dtype)
    return (v - theta).clamp_min(0)


def largest_eigenvalue(M: Tensor, iterations: int = 30) -> Tensor:
    """λ_max of a PSD matrix by power iteration (a 0-d tensor, > 0)."""
    v = torch.ones(M.shape[0], dtype=M.dtype, device=M.device) / M.shape[0] ** 0.5
    for _ in range(iterations):
        v = M @ v
        v = v / v.norm().clamp_min(torch.finfo(M.dtype).tiny)
    return (v @ (M @ v)).clamp_min(torch.finfo(M.dtype).eps * M.diagonal().abs().max().clamp_min(1e-30))


def min_quadratic(M: Tensor, start: Tensor, project, iterations: int = 500) -> Tensor:
    """argmin of ½·vᵀMv over a convex set, by accelerated projected gradient (FISTA) with step 1/λ_max.

    ``start`` holds one starting point per row (several problems at once); ``project`` maps rows onto the set.
    """
    step = 1.0 / largest_eigenvalue(M)
    x = project(start)
    y = x
    momentum = torch.ones((), dtype=M.dtype, device=M.device)
    for _ in range(iterations):
        x_next = project(y - step * (y @ M))
        momentum_next = (1 + torch.sqrt(1 + 4 * momentum * momentum)) / 2
        y = x_next + ((momentum - 1) / momentum_next) * (x_next - x)
        x, momentum = x_next, momentum_next
    return x


def minimize_on_simplex(objective, gradient, start: Tensor, iterations: int = 300) -> Tensor:
    """argmin of a convex function over the simplex by projected gradient with a sync-free adaptive step:
    a step that lowers the objective is taken and lengthened, one that does not is refused and halved."""
    x = project_simplex(start)
    value = objective(x)
    step = torch.ones((), dtype=x.dtype, device=x.device) / gradient(x).abs().max().clamp_min(1e-30)
    for _ in range(iterations):
        candidate = project_simplex(x - step * gradient(x))
        candidate_value = objective(candidate)
        better = candidate_value < value
        x = torch.where(better, candidate, x)
        value = torch.where(better, candidate_value, value)
        step = torch.where(better, step * 1.5, step * 0.5)
    return x
