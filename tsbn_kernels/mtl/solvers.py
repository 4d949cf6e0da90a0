"""Small convex solvers on a T×T Gramian, written as fixed-iteration tensor programs.

No .item(), no data-dependent Python branch: every step is a tensor op on the Gramian's device, so an
aggregation step can be captured in a CUDA graph. Iteration counts are set for T up to ~64; the tests check
them against scipy in float64.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def project_simplex(v: Tensor, a: Tensor | None = None) -> Tensor:
    """Euclidean projection of each row of v onto the simplex {u ≥ 0, Σ a_i·u_i = 1} (a > 0; None: all ones, the
    probability simplex). Sort-based: u = max(v − θ·a, 0), and with the ratios v_i/a_i in descending order, θ is
    the largest of the candidates θ_k = (Σ_{i≤k} a_i·v_i − 1) / Σ_{i≤k} a_i² (each θ_k averages θ_{k−1} with
    v_k/a_k, so they rise while the ratios exceed them and fall after: the peak is the support's θ)."""
    if a is None:
        u, _ = torch.sort(v, dim=-1, descending=True)
        k = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
        theta = ((u.cumsum(dim=-1) - 1) / k).amax(dim=-1, keepdim=True)
        return (v - theta).clamp_min(0)
    a = a.expand_as(v)
    order = torch.argsort(v / a, dim=-1, descending=True)
    av, aa = (a * v).gather(-1, order), (a * a).gather(-1, order)
    theta = ((av.cumsum(dim=-1) - 1) / aa.cumsum(dim=-1)).amax(dim=-1, keepdim=True)
    return (v - theta * a).clamp_min(0)


def jacobi_scale(M: Tensor) -> Tensor:
    """d with M / (d·dᵀ) of unit diagonal: d_t = |g_t|, floored at 1e-6 of the largest (zero rows; and the
    weighted simplex's 1/d stays within float32's range), all ones when M = 0. Any positive d leaves the
    solution unchanged; this one makes a first-order solver's speed independent of the tasks' gradient norms."""
    d = M.diagonal().clamp_min(0).sqrt()
    top = d.max()
    return torch.where(top > 0, d.clamp_min(1e-6 * top), torch.ones_like(d))


POWER_ITERATIONS = 30


def largest_eigenvalue(M: Tensor, iterations: int = POWER_ITERATIONS) -> Tensor:
    """λ_max of a PSD matrix by power iteration (a 0-d tensor, > 0)."""
    # Iterated on M scaled to a unit diagonal maximum: M·v of gradients with norms ~1e12 squares past float32's
    # range inside the norm, and v would collapse to 0.
    scale = M.diagonal().max().clamp_min(torch.finfo(M.dtype).tiny)
    M = M / scale
    # Started from the column of the largest diagonal entry: it lies in M's range (a start of all ones is in the
    # null space of exactly opposed gradients, and the estimate then collapses to ~0: a step that diverges).
    v = M.gather(1, M.diagonal().argmax().reshape(1, 1).expand(M.shape[0], 1)).squeeze(1)
    v = v / v.norm().clamp_min(torch.finfo(M.dtype).tiny)
    for _ in range(iterations):
        v = M @ v
        v = v / v.norm().clamp_min(torch.finfo(M.dtype).tiny)
    # Scaled, λ_max ≥ the unit diagonal maximum; the floor of 1 also keeps M = 0 at a finite, positive λ.
    return (v @ (M @ v)).clamp_min(1.0) * scale


def min_quadratic(M: Tensor, start: Tensor, *, simplex: bool, iterations: int = 500, fused: bool | None = None
                  ) -> Tensor:
    """argmin of ½·vᵀMv, one problem per row of ``start``: over the probability simplex from ``start``
    (simplex=True), or over the box {v ≥ start}.

    Accelerated projected gradient (FISTA, step 1/λ_max) in Jacobi-scaled coordinates u = d·v (jacobi_scale):
    tasks whose gradients differ in norm by orders of magnitude would otherwise make it crawl (the small ones'
    directions converge at the rate λ_small/λ_max). The box stays a box, the simplex becomes {u ≥ 0, Σ u/d = 1}.
    ``fused``: one Triton launch for the whole solve (triton_solvers; None: on CUDA where it applies and no
    graph through M is being recorded), else the tensor program below.
    """
    one_launch = fused_solvers(M, fused, lambda ts: ts.applies(M, simplex),
                               lambda ts: f"solver holds at most {ts.MAX_TASKS} tasks in float32/float64 "
                                          f"({ts.MAX_TASKS_FLOAT64_SIMPLEX} on the float64 simplex)")
    if one_launch is not None:
        return one_launch.min_quadratic(M, start, simplex, iterations, POWER_ITERATIONS)
    d = jacobi_scale(M)
    scaled = M / (d.unsqueeze(0) * d.unsqueeze(1))
    start = start * d
    if simplex:
        inverse = 1 / d
        project = lambda u: project_simplex(u, inverse)  # noqa: E731
    else:
        project = lambda u: torch.maximum(u, start)  # noqa: E731
    step = 1.0 / largest_eigenvalue(scaled, POWER_ITERATIONS)
    # y − step·(y·S) as one product with I − step·S, and Nesterov's extrapolation as one lerp with coefficients
    # that depend on the iteration count alone (computed here on the host, not as device scalars): three
    # kernels an iteration for a box, where a GPU spends its time launching them.
    descent = torch.eye(M.shape[0], dtype=M.dtype, device=M.device) - step * scaled
    x = project(start)
    y = x
    momentum = 1.0
    for _ in range(iterations):
        x_next = project(y @ descent)
        momentum_next = (1 + math.sqrt(1 + 4 * momentum * momentum)) / 2
        y = torch.lerp(x, x_next, 1 + (momentum - 1) / momentum_next)
        x, momentum = x_next, momentum_next
    return x / d


def fused_solvers(M: Tensor, fused: bool | None, applies, limits):
    """The triton_solvers module when a solve on M is to take its one-launch form, else None. ``applies(module)``
    says whether that form takes M, ``limits(module)`` what it takes (for the error). fused=None: on CUDA where it
    applies and no graph through M is being recorded (autograd needs the tensor program); True: it must apply
    (ValueError otherwise); False: never."""
    if fused is None:
        if not M.is_cuda or (torch.is_grad_enabled() and M.requires_grad):
            return None
    elif not fused:
        return None
    try:
        from . import triton_solvers
    except ImportError:
        if fused:
            raise
        return None
    if applies(triton_solvers):
        return triton_solvers
    if fused:
        raise ValueError(f"the fused {limits(triton_solvers)}; got {M.shape[0]} in {M.dtype}")
    return None


def minimize_on_simplex(objective, gradient, start: Tensor, iterations: int = 300, scale: Tensor | None = None
                        ) -> Tensor:
    """argmin of a convex function over the simplex by projected gradient with a sync-free adaptive step:
    a step that lowers the objective is taken and lengthened, one that does not is refused and halved.

    ``scale`` d > 0 (jacobi_scale of the Gramian): iterate in u = d·x over {u ≥ 0, Σ u/d = 1}, as min_quadratic
    does: in x, the directions of tasks with small gradients get steps sized for the largest and stall (cagrad at
    norms 1e2..1e-2, T=7: the objective still 470% above its optimum after 300 steps, 350% after 3000).
    ``objective`` and ``gradient`` take x."""
    inverse = torch.ones_like(start) if scale is None else 1 / scale
    weights = None if scale is None else inverse          # None: project_simplex's unweighted form

    def u_gradient(u):
        return gradient(u * inverse) * inverse

    u = project_simplex(start / inverse, weights)
    value = objective(u * inverse)
    step = torch.ones((), dtype=u.dtype, device=u.device) / u_gradient(u).abs().max().clamp_min(1e-30)
    for _ in range(iterations):
        candidate = project_simplex(u - step * u_gradient(u), weights)
        candidate_value = objective(candidate * inverse)
        better = candidate_value < value
        u = torch.where(better, candidate, u)
        value = torch.where(better, candidate_value, value)
        step = torch.where(better, step * 1.5, step * 0.5)
    return u * inverse


def _round_robin_pairs(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The n−1 rounds of a round-robin tournament on n (even) players, [n−1, n/2] each side: each round pairs every
    player once (the circle method: player 0 fixed, the others rotating). Built on the device with tensor ops: a
    host list copied there would be a synchronising copy, which a CUDA-graph capture refuses."""
    rounds = torch.arange(n - 1, device=device).unsqueeze(1)
    positions = torch.arange(n // 2, device=device).unsqueeze(0)

    def player(position: Tensor) -> Tensor:
        return torch.where(position == 0, 0, torch.remainder(position - 1 - rounds, n - 1) + 1)
    return player(positions), player(n - 1 - positions)


def symmetric_eigh(M: Tensor, sweeps: int = 8) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors (columns) of a small symmetric matrix, unordered, in float64, by cyclic Jacobi
    with the rotations of a round-robin ordering applied n/2 at a time.

    Why not torch.linalg.eigh: on a GPU it checks its info flag on the host, a synchronisation that also makes a
    CUDA-graph capture fail. Here every step is a tensor op and the sweep count is fixed (Jacobi converges
    quadratically: 5 sweeps reach float64 precision at T = 40, 7 at T = 64; 8 are run)."""
    T = M.shape[0]
    n = T + T % 2                                  # odd T: a decoupled zero row, whose rotations are identities
    A = torch.zeros(n, n, dtype=torch.float64, device=M.device)
    A[:T, :T] = M.to(torch.float64)
    V = torch.eye(n, dtype=torch.float64, device=M.device)
    if n == 1 or T == 0:
        return A.diagonal()[:T].clone(), V[:T, :T]
    all_p, all_q = _round_robin_pairs(n, M.device)
    # Where each round reads (p,p), (q,q), (p,q) of every pair, and where its rotation entries go: those and (q,p).
    read_rows = torch.cat([all_p, all_q, all_p], dim=1)
    read_cols = torch.cat([all_p, all_q, all_q], dim=1)
    rotation_rows = torch.cat([all_p, all_q, all_p, all_q], dim=1)
    rotation_cols = torch.cat([all_p, all_q, all_q, all_p], dim=1)
    eye = torch.eye(n, dtype=torch.float64, device=M.device)
    half = n // 2
    for _ in range(sweeps):          # ~17 small kernels a round: a GPU runs this launch-bound, or in a CUDA graph
        for r in range(n - 1):
            app, aqq, apq = A[read_rows[r], read_cols[r]].view(3, half)
            # tan 2θ = 2·apq / (aqq − app) zeroes A[p, q]; the root with |θ| ≤ π/4 (the one Jacobi converges with):
            # 2θ from atan2 brought into [−π/2, π/2).
            two_theta = torch.remainder(torch.atan2(2 * apq, aqq - app) + math.pi / 2, math.pi) - math.pi / 2
            c, s = torch.cos(0.5 * two_theta), torch.sin(0.5 * two_theta)
            J = eye.index_put((rotation_rows[r], rotation_cols[r]), torch.cat([c, c, s, -s]))
            A = J.T @ A @ J
            V = V @ J
    return A.diagonal()[:T].clone(), V[:T, :T]
