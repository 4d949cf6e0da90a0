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
A zero-norm task row adds nothing to wᵀG, so its own weight is whatever the method's limit gives: IMTL-G's puts
all the weight on it (equal projections on every task: d = 0), Nash-MTL's α_t grows without bound, CAGrad's is
large; the direction is right, the weights of such a task are not informative.

No torch.linalg call that checks its result on the host (eigh, svd, pinv, solve): on a GPU each is a
synchronisation, and a CUDA-graph capture fails on it. Linear systems use solve_ex(check_errors=False); the
eigendecomposition of aligned_mtl is solvers.symmetric_eigh off the CPU.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .solvers import fused_solvers, jacobi_scale, min_quadratic, minimize_on_simplex, symmetric_eigh


def _tiny(M: Tensor) -> float:
    # The smallest normal number, not eps: squared norms of 1e-4-sized gradients are below float32's eps, and a
    # clamp there would shrink PCGrad's projections of small task gradients.
    return torch.finfo(M.dtype).tiny


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
    tasks = torch.arange(T, device=device)
    for k in range(T):
        j = orders[:, k]                                  # the task each row projects against at step k
        dots = (C * M[:, j].T).sum(dim=1)                 # g_i' · g_j for every i at once
        safe = norms[j].clamp_min(_tiny(M))
        coef = torch.where((dots < 0) & (norms[j] > 0), dots / safe, torch.zeros_like(dots))
        # one_hot would check the index range on the host (a sync on the CPU); a comparison does not.
        C = C - coef.unsqueeze(1) * (j.unsqueeze(1) == tasks).to(M.dtype)
    return C.sum(dim=0)


def mgda(M: Tensor, iterations: int = 500) -> Tensor:
    start = mean(M).unsqueeze(0)
    return min_quadratic(M, start, simplex=True, iterations=iterations).squeeze(0)


def cagrad(M: Tensor, c: float = 0.5, rescale: bool = True, iterations: int = 300, fused: bool | None = None
           ) -> Tensor:
    """``fused``: the whole weighting in one Triton launch (triton_solvers.cagrad; None: on CUDA where it applies
    and no graph through M is being recorded), else the tensor program below, ~20 small kernels a step."""
    one_launch = fused_solvers(M, fused, lambda ts: ts.cagrad_applies(M),
                               lambda ts: f"cagrad holds at most {ts.MAX_TASKS} tasks in float32 "
                                          f"({ts.MAX_TASKS_FLOAT64_CAGRAD} in float64)")
    if one_launch is not None:
        return one_launch.cagrad(M, c, rescale, iterations)
    b = mean(M)
    g0_norm = (M.mean() + 1e-8).sqrt()
    radius = c * g0_norm + 1e-8
    Mb = M @ b

    def objective(x):
        return x @ Mb + radius * (x @ M @ x + 1e-8).sqrt()

    def gradient(x):
        return Mb + radius * (M @ x) / (x @ M @ x + 1e-8).sqrt()

    x = minimize_on_simplex(objective, gradient, b, iterations, scale=jacobi_scale(M))
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
    alpha_rest = _solve_rows(D_U, g0_U)
    return torch.cat([(1 - alpha_rest.sum()).unsqueeze(0), alpha_rest])


def _solve_rows(A: Tensor, b: Tensor, refinements: int = 4) -> Tensor:
    """The minimum-norm least-squares x of x·A = b (pinv(A)'s answer), in float64 and without a host sync: Tikhonov
    with a ridge at 1e-10 of the mean squared singular value, refined iteratively. Each refinement shrinks the
    error along a singular value σ by δ/(σ² + δ), so regular systems come out exact and directions with σ² ≪ δ
    (parallel, zero or opposed task gradients) stay out, as pinv's cutoff leaves them."""
    A64, b64 = A.to(torch.float64), b.to(torch.float64)
    n = A.shape[0]
    gram = A64 @ A64.T
    ridge = 1e-10 * gram.diagonal().sum() / max(n, 1) + torch.finfo(torch.float64).tiny
    system = gram + ridge * torch.eye(n, dtype=torch.float64, device=A.device)
    x = torch.zeros_like(b64)
    for _ in range(refinements + 1):
        step, _ = torch.linalg.solve_ex(system, A64 @ (b64 - x @ A64), check_errors=False)
        x = x + step
    return x.to(A.dtype)


def nash_mtl(M: Tensor, iterations: int = 40) -> Tensor:
    diag = M.diagonal().clamp_min(_tiny(M))
    alpha = 1.0 / diag.sqrt()
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    # Keeps the Newton system solvable where no bargaining solution exists (exactly opposed gradients: α grows
    # without bound and 1/α² vanishes next to a singular M). Per task, at 1e-7 of its own |g_t|²: one ridge at the
    # mean diagonal swamped the Hessian entries of small tasks, and Newton stalled at norm ratios of ~1e5.
    ridge = torch.diag(1e-7 * diag)
    for _ in range(iterations):
        grad = M @ alpha - 1.0 / alpha
        hessian = M + eye / (alpha * alpha).unsqueeze(1)
        delta, _ = torch.linalg.solve_ex(hessian + ridge, grad, check_errors=False)
        delta = torch.where(torch.isfinite(delta), delta, torch.zeros_like(delta))
        # Fraction to the boundary: never step past 1% of the way to α = 0.
        limit = torch.where(delta > 0, 0.99 * alpha / delta.clamp_min(_tiny(M)), torch.full_like(alpha, 1.0))
        alpha = alpha - limit.min().clamp(max=1.0) * delta
    return alpha


def upgrad(M: Tensor, iterations: int = 500) -> Tensor:
    scale = M.diagonal().sum().clamp_min(_tiny(M))       # the argmin does not depend on M's scale
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    return min_quadratic(M / scale, eye, simplex=False, iterations=iterations).mean(dim=0)   # argmin_{v ≥ e_t}


def dualproj(M: Tensor, iterations: int = 500) -> Tensor:
    scale = M.diagonal().sum().clamp_min(_tiny(M))
    return min_quadratic(M / scale, mean(M).unsqueeze(0), simplex=False, iterations=iterations).squeeze(0)


def _eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """LAPACK on the CPU (no device to synchronise with); the sync-free Jacobi tensor program elsewhere."""
    if M.device.type != "cpu":
        return symmetric_eigh(M)
    # LAPACK raises on NaN/Inf: decompose the identity instead and give NaN, as the device program does, so that an
    # overflowed loss-scaled step is non-finite and skipped by the GradScaler like any other method's (no host read).
    M = M.to(torch.float64)
    finite = torch.isfinite(M).all()
    eigenvalues, V = torch.linalg.eigh(torch.where(finite, M, torch.eye(M.shape[0], dtype=M.dtype)))
    nan = torch.tensor(float("nan"), dtype=M.dtype)
    return torch.where(finite, eigenvalues, nan), torch.where(finite, V, nan)


def aligned_mtl(M: Tensor, rank_tol: float = 1e-7) -> Tensor:
    # B is invariant to M's scale: normalising first keeps gradients of any magnitude (1e-20 or 1e15) exact.
    scaled = M.to(torch.float64) / M.diagonal().sum().to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny)
    eigenvalues, V = _eigh(scaled)
    kept = eigenvalues > rank_tol * eigenvalues.max()         # nothing kept when M = 0: then w = 0, not NaN
    smallest = torch.where(kept, eigenvalues, torch.full_like(eigenvalues, float("inf"))).min()
    smallest = torch.where(kept.any(), smallest, torch.zeros_like(smallest))
    inv_sqrt = torch.where(kept, eigenvalues.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(),
                           torch.zeros_like(eigenvalues))
    B = smallest.sqrt() * (V * inv_sqrt) @ V.T
    return (B @ mean(scaled)).to(M.dtype)


WEIGHTINGS = {
    "mean": mean, "sum": sum_, "pcgrad": pcgrad, "mgda": mgda, "cagrad": cagrad, "imtl_g": imtl_g,
    "nash_mtl": nash_mtl, "upgrad": upgrad, "dualproj": dualproj, "aligned_mtl": aligned_mtl,
}
