"""The one-launch Triton solver of the weightings (mtl/triton_solvers.py) against the tensor program it replaces
on a GPU: the same iterates (float64) on random and degenerate Gramians, the box and the simplex, and mgda /
upgrad / dualproj through it against their scipy optimum. On the CPU under TRITON_INTERPRET=1 (small T and
few iterations: the interpreter runs each program's loop in Python), on CUDA tensors where a GPU is present."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
from tsbn_kernels.mtl import solvers, weightings  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (make test sets it)")


def gramian(kind: str, T: int, dtype=torch.float64, seed=0) -> torch.Tensor:
    G = torch.randn(T, 24, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if kind == "opposite" and T > 1:
        G[1] = -G[0]
    elif kind == "zero_row" and T > 2:
        G[2] = 0
    elif kind == "graded":
        G *= torch.logspace(-3, 3, T, dtype=torch.float64).unsqueeze(1)
    elif kind == "all_zero":
        G.zero_()
    elif kind == "huge":
        G *= 1e12
    return (G @ G.T).to(device=DEVICE, dtype=dtype)


KINDS = ["random", "opposite", "zero_row", "graded", "all_zero", "huge"]


def objective(M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((x @ M) * x).sum(dim=-1)


def assert_same_solve(M, got, want):
    """The same iterates where the problem is well conditioned; elsewhere (graded norms, rank deficiency) rounding
    of two operation orders parts the trajectories, so: the same objective value."""
    scale = M.diagonal().sum().clamp_min(1e-300)
    torch.testing.assert_close(objective(M, got) / scale, objective(M, want) / scale, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 2, 5, 31])
def test_simplex_solve_equals_the_tensor_program(kind, T):
    M = gramian(kind, T, seed=T)
    start = torch.full((1, T), 1.0 / T, dtype=M.dtype, device=DEVICE)
    iterations = 500 if T > 5 else 120
    want = solvers.min_quadratic(M, start, simplex=True, iterations=iterations, fused=False)
    got = solvers.min_quadratic(M, start, simplex=True, iterations=iterations, fused=True)
    if kind == "random" and T < 31:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert_same_solve(M, got, want)
    assert abs(got.sum().item() - 1) < 1e-12 and (got >= 0).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 3, 6])
def test_box_solves_equal_the_tensor_program(kind, T):
    M = gramian(kind, T, seed=10 + T)
    M = M / M.diagonal().sum().clamp_min(1e-300)
    lower = torch.eye(T, dtype=M.dtype, device=DEVICE) + 0.1 * torch.rand(T, T, dtype=M.dtype, device=DEVICE)
    want = solvers.min_quadratic(M, lower, simplex=False, iterations=120, fused=False)
    got = solvers.min_quadratic(M, lower, simplex=False, iterations=120, fused=True)
    if kind == "random":
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert_same_solve(M, got, want)
    assert (got >= lower * (1 - 1e-12)).all()     # u ≥ d·lower, divided by d again: equal to rounding


def test_float32_gramian_stays_float32_and_finite():
    M = gramian("graded", 7, dtype=torch.float32)
    start = torch.full((1, 7), 1 / 7, dtype=torch.float32, device=DEVICE)
    got = solvers.min_quadratic(M, start, simplex=True, iterations=60, fused=True)
    want = solvers.min_quadratic(M, start, simplex=True, iterations=60, fused=False)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_more_tasks_than_one_program_holds_take_the_tensor_program():
    from tsbn_kernels.mtl import triton_solvers

    big = torch.eye(triton_solvers.MAX_TASKS + 1, device=DEVICE)
    assert not triton_solvers.applies(big, False) and triton_solvers.applies(big[:-1, :-1], True)
    assert not triton_solvers.applies(big.half()[:4, :4], False)
    assert not triton_solvers.applies(big.double()[:33, :33], True) and triton_solvers.applies(big.double()[:33, :33],
                                                                                            False)
    with pytest.raises(ValueError, match="fused solver"):
        solvers.min_quadratic(big, big[:1], simplex=False, fused=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_weightings_through_the_fused_solver_reach_the_optimum(seed, monkeypatch):
    """mgda's min-norm point and upgrad's dual-cone projections, solved by the fused kernel, against scipy."""
    from scipy import optimize

    M = gramian("random", 4, seed=seed)
    M[1] *= 0.3              # task 1's gradient 0.3 times as long: row and column of its Gramian
    M[:, 1] *= 0.3
    fused = solvers.min_quadratic

    def always_fused(*args, **kwargs):
        return fused(*args, **{**kwargs, "fused": True})
    monkeypatch.setattr(weightings, "min_quadratic", always_fused)
    Mn = M.cpu().numpy()
    T = Mn.shape[0]
    w = weightings.mgda(M).cpu().numpy()
    best = optimize.minimize(lambda x: x @ Mn @ x, np.full(T, 1 / T), method="SLSQP", bounds=[(0, 1)] * T,
                             constraints=({"type": "eq", "fun": lambda x: x.sum() - 1},), options={"ftol": 1e-15})
    assert w @ Mn @ w <= best.fun + 1e-7 * np.trace(Mn)
    scaled = Mn / np.trace(Mn)
    up = weightings.upgrad(M).cpu().numpy()
    want = np.mean([optimize.minimize(lambda v: v @ scaled @ v, np.eye(T)[i], jac=lambda v: 2 * scaled @ v,
                                      method="L-BFGS-B", bounds=[(lo, None) for lo in np.eye(T)[i]],
                                      options={"ftol": 1e-15, "gtol": 1e-12}).x for i in range(T)], axis=0)
    # Compared through M (the directions wᵀG): the weights of a singular M are not unique.
    assert (up - want) @ scaled @ (up - want) <= 1e-8 * max(want @ scaled @ want, 1e-12)
