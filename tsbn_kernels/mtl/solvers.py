"""Small convex solvers on a T×T Gramian, written as fixed-iteration tensor programs.

No .item(), no data-dependent Python branch: every step is a tensor op on the Gramian's device, so an
aggregation step can be captured in a CUDA graph. Iteration counts are set for T up to ~64; the tests check
them against scipy in float64.
"""
from __future__ import annotations

import math

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


def min_quadratic(M: Tensor, start: Tensor, project, iterations: int = 500) -> Tensor:
    """argmin of ½·vᵀMv over a convex set, by accelerated projected gradient (FISTA) with step 1/λ_max.

    ``start`` holds one starting point per row (several problems at once); ``project`` maps rows onto the set.
    """
    step = 1.0 / largest_eigenvalue(M)
    # y − step·(y·M) as one product with I − step·M, and Nesterov's extrapolation as one lerp with coefficients
    # that depend on the iteration count alone (computed here on the host, not as device scalars): three
    # kernels an iteration for a box, where a GPU spends its time launching them.
    descent = torch.eye(M.shape[0], dtype=M.dtype, device=M.device) - step * M
    x = project(start)
    y = x
    momentum = 1.0
    for _ in range(iterations):
        x_next = project(y @ descent)
        momentum_next = (1 + math.sqrt(1 + 4 * momentum * momentum)) / 2
        y = torch.lerp(x, x_next, 1 + (momentum - 1) / momentum_next)
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
