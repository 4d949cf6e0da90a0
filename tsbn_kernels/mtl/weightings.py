"""Task weightings computed from the Gramian M = G·Gᵀ alone (DESIGN.md §3): the aggregated gradient is wᵀG.

Each function takes M [T, T] (float32/float64, on any device) and returns w [T] on M's device without a host
synchronisation. Scale conventions (what Σ w_t is, so the step size means the same as in the original code):
  mean      1/T each: the average gradient.
  sum       1 each: the sum of the task gradients.
  pcgrad    Yu et al. 2020: every g_i is projected, in a random task order of its own, off each g_j it
            conflicts with (g_i·g_j < 0); the result is the SUM of the projected gradients (their code, LibMTL).
  mgda      Sener & Koltun 2018: the min-norm point of the convex hull of the g_t; Σ w = 1.
  cagrad    Liu et al. 2021, official formulation: g0 + λ·g_w, divided by (1 + c²) when rescale=True.
  imtl_g    Liu et al. 2021 (IMTL-G): the closed form giving equal projections on every unit task direction;
            Σ w = 1.
  nash_mtl  Navon et al. 2022: the Nash bargaining solution α with (Mα)_t = 1/α_t, α > 0 (damped Newton on
            ½αᵀMα − Σ log α_t), no normalisation (the paper's update Σ α_t g_t).
  upgrad    Quinton & Rey 2024 (TorchJD): the mean of the projections of each e_t onto the dual cone
            {v : Mv ≥ 0} in the M-norm, i.e. mean_t argmin_{v ≥ e_t} vᵀMv.
  dualproj  TorchJD: the projection of the mean weighting (1/T each) onto the dual cone: argmin_{v ≥ 1/T} vᵀMv.
  aligned_mtl Senushkin et al. 2023: the gradients are aligned to the condition number 1 by
            B = sqrt(λ_min)·V·Λ^{-1/2}·Vᵀ (on the non-null eigenspace of M) and averaged: w = B·(1/T).
Zero-norm task rows get weight 0 where a method would divide by their norm.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .solvers import min_quadratic, minimize_on_simplex, project_simplex


def _tiny(M: Tensor) -> float:
    return torch.finfo(M.dtype).eps


def mean(M: Tensor) -> Tensor:
    return torch.full((M.shape[0],), 1.0 / M.shape[0], dtype=M.dtype, device=M.device)


def sum_(M: Tensor) -> Tensor:
    return torch.ones(M.shape[0], dtype=M.dtype, device=M.device)


def pcgrad(M: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Exact PCGrad as coefficients: row i of C expresses the projected g_i' = Σ_k C_ik g_k."""
    T = M.shape[0]
    device = M.device
    gen_device = generator.device if generator is not None else device
    orders = torch.argsort(torch.rand(T, T, generator=generator, device=gen_device), dim=1).to(device)
    C = torch.eye(T, dtype=M.dtype, device=device)
    norms = M.diagonal()
    for k in range(T):
        j = orders[:, k]                                  # the task each row projects against at step k
        dots = (C * M[:, j].T).sum(dim=1)                 # g_i' · g_j for every i at once
        safe = norms[j].clamp_min(_tiny(M))
        coef = torch.where((dots < 0) & (norms[j] > 0), dots / safe, torch.zeros_like(dots))
        C = C - coef.unsqueeze(1) * torch.nn.functional.one_hot(j, T).to(M.dtype)
    return C.sum(dim=0)


def mgda(M: Tensor, iterations: int = 500) -> Tensor:
    start = mean(M).unsqueeze(0)
    return min_quadratic(M, start, project_simplex, iterations).squeeze(0)


def cagrad(M: Tensor, c: float = 0.5, rescale: bool = True, iterations: int = 300) -> Tensor:
    T = M.shape[0]
    b = mean(M)
    g0_norm = (M.mean() + 1e-8).sqrt()
    radius = c * g0_norm + 1e-8
    Mb = M @ b

    def objective(x):
        return x @ Mb + radius * (x @ M @ x + 1e-8).sqrt()

    def gradient(x):
        return Mb + radius * (M @ x) / (x @ M @ x + 1e-8).sqrt()

    x = minimize_on_simplex(objective, gradient, b, iterations)
    gw_norm = (x @ M @ x).clamp_min(0).sqrt()
    w = b + (radius / (gw_norm + 1e-8)) * x
    return w / (1 + c * c) if rescale else w


def imtl_g(M: Tensor) -> Tensor:
    T = M.shape[0]
    if T == 1:
        return torch.ones(1, dtype=M.dtype, device=M.device)
    norms = M.diagonal().clamp_min(0).sqrt()
    inv = torch.where(norms > 0, 1.0 / norms.clamp_min(_tiny(M)), torch.zeros_like(norms))
    # D = [g_0 − g_i], U = [u_0 − u_i] for i = 1..T−1, everything through M.
    g0_u = M[0] * inv                                    # g_0 · u_j
    gi_u = M * inv.unsqueeze(0)                          # g_i · u_j
    g0_U = g0_u[0] - g0_u[1:]                            # g_0 · (u_0 − u_j)
    D_U = (gi_u[0, 0] - gi_u[1:, 0]).unsqueeze(1) - (gi_u[0, 1:].unsqueeze(0) - gi_u[1:, 1:])
    alpha_rest = g0_U @ torch.linalg.pinv(D_U)
    return torch.cat([(1 - alpha_rest.sum()).unsqueeze(0), alpha_rest])


def nash_mtl(M: Tensor, iterations: int = 40) -> Tensor:
    diag = M.diagonal().clamp_min(_tiny(M))
    alpha = 1.0 / diag.sqrt()
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    for _ in range(iterations):
        grad = M @ alpha - 1.0 / alpha
        hessian = M + eye / (alpha * alpha).unsqueeze(1)
        delta = torch.linalg.solve(hessian, grad)
        # Fraction to the boundary: never step past 1% of the way to α = 0.
        limit = torch.where(delta > 0, 0.99 * alpha / delta.clamp_min(_tiny(M)), torch.full_like(alpha, 1.0))
        alpha = alpha - limit.min().clamp(max=1.0) * delta
    return alpha


def _dual_cone_projection(M: Tensor, lower: Tensor, iterations: int) -> Tensor:
    """argmin_{v ≥ lower} ½ vᵀMv for each row of ``lower``.

    Solved in Jacobi-scaled coordinates u = D^{1/2}v (unit diagonal): tasks whose gradients differ in norm by
    orders of magnitude would otherwise make the first-order solver crawl. The box stays a box."""
    diag = M.diagonal()
    d = torch.where(diag > 0, diag.clamp_min(_tiny(M)).sqrt(), torch.ones_like(diag))
    scaled = M / (d.unsqueeze(0) * d.unsqueeze(1))
    scaled_lower = lower * d
    u = min_quadratic(scaled, scaled_lower, lambda v: torch.maximum(v, scaled_lower), iterations)
    return u / d


def upgrad(M: Tensor, iterations: int = 500) -> Tensor:
    scale = M.diagonal().sum().clamp_min(_tiny(M))       # the argmin does not depend on M's scale
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    return _dual_cone_projection(M / scale, eye, iterations).mean(dim=0)


def dualproj(M: Tensor, iterations: int = 500) -> Tensor:
    scale = M.diagonal().sum().clamp_min(_tiny(M))
    return _dual_cone_projection(M / scale, mean(M).unsqueeze(0), iterations).squeeze(0)


def aligned_mtl(M: Tensor, rank_tol: float = 1e-7) -> Tensor:
    eigenvalues, V = torch.linalg.eigh(M)
    kept = eigenvalues > rank_tol * eigenvalues.max().clamp_min(_tiny(M))
    smallest = torch.where(kept, eigenvalues, torch.full_like(eigenvalues, float("inf"))).min()
    inv_sqrt = torch.where(kept, eigenvalues.clamp_min(_tiny(M)).rsqrt(), torch.zeros_like(eigenvalues))
    B = smallest.clamp_min(0).sqrt() * (V * inv_sqrt) @ V.T
    return B @ mean(M)


WEIGHTINGS = {
    "mean": mean, "sum": sum_, "pcgrad": pcgrad, "mgda": mgda, "cagrad": cagrad, "imtl_g": imtl_g,
    "nash_mtl": nash_mtl, "upgrad": upgrad, "dualproj": dualproj, "aligned_mtl": aligned_mtl,
}
