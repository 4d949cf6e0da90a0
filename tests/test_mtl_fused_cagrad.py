"""cagrad in one Triton launch (triton_solvers.cagrad) against the tensor program of weightings.cagrad it replaces
on a GPU: the plain simplex projection, the same iterates in float64 on well-conditioned problems, the same
objective on degenerate ones and in float32, scipy's optimum, and the dispatch. On the CPU under
TRITON_INTERPRET=1 (few iterations where the point is equality: the interpreter runs the loop in Python), on
CUDA tensors where a GPU is present."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from tsbn_kernels.mtl import solvers, triton_solvers, weightings  # noqa: E402
from tsbn_kernels.mtl.triton_solvers import _project  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
runs_triton = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (make test sets it)")


def gramian(kind: str, T: int, dtype=torch.float64, seed=0) -> torch.Tensor:
    G = torch.randn(T, max(24, 2 * T), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if kind == "opposite" and T > 1:
        G[1] = -G[0]
    elif kind == "zero_row" and T > 2:
        G[2] = 0
    elif kind == "graded":
        G *= torch.logspace(2, -2, T, dtype=torch.float64).unsqueeze(1)
    elif kind == "all_zero":
        G.zero_()
    elif kind == "huge":
        G *= 1e12
    return (G @ G.T).to(device=DEVICE, dtype=dtype)


def solution(w: torch.Tensor, c: float = 0.5, rescale: bool = True) -> torch.Tensor:
    """The simplex point x of cagrad's weights w = (b + λ·x) / (1 + c²), λ > 0 (float64)."""
    w = w.double() * ((1 + c * c) if rescale else 1.0)
    lam_x = w - 1.0 / w.shape[0]
    return lam_x / lam_x.sum()


def objective(M: torch.Tensor, x: torch.Tensor, c: float = 0.5) -> float:
    """cagrad's x·(M b) + radius·sqrt(xᵀMx + 1e-8), in float64."""
    M = M.double()
    b = torch.full_like(x, 1.0 / x.shape[0])
    radius = c * (M.mean() + 1e-8).sqrt() + 1e-8
    return (x @ M @ b + radius * (x @ M @ x + 1e-8).sqrt()).item()


def assert_same_objective(M, got, want, rtol):
    x_got, x_want = solution(got), solution(want)
    assert (x_got >= -100 * torch.finfo(got.dtype).eps).all()      # b taken back out of w: rounding of w's dtype
    f_got, f_want = objective(M, x_got), objective(M, x_want)
    assert abs(f_got - f_want) <= rtol * abs(f_want), (f_got, f_want)


@triton.jit
def _plain_projection_kernel(v_ptr, out_ptr, T, BLOCK_T: tl.constexpr):
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK_T)
    ok = i < T
    v = tl.load(v_ptr + row * T + i, mask=ok, other=0.0)
    tl.store(out_ptr + row * T + i, _project(v, tl.full([BLOCK_T], 1.0, v.dtype), v, ok, True), mask=ok)


@runs_triton
@pytest.mark.parametrize("T", [1, 2, 5, 8, 64])
def test_plain_projection_equals_project_simplex(T):
    """_project with weights 1 is project_simplex(v) without weights: candidates over ties taken whole instead of
    one by one have the same maximum (θ moves monotonically across a tie)."""
    g = torch.Generator().manual_seed(T)
    rows = [torch.randn(T, generator=g, dtype=torch.float64), 1e6 * torch.randn(T, generator=g, dtype=torch.float64),
            1e-6 * torch.randn(T, generator=g, dtype=torch.float64), torch.full((T,), 0.3, dtype=torch.float64),
            torch.randint(-2, 3, (T,), generator=g).double() / 2,         # ties
            torch.eye(T, dtype=torch.float64)[0] * 5, -torch.rand(T, generator=g, dtype=torch.float64) - 3]
    v = torch.stack(rows).to(DEVICE)
    out = torch.empty_like(v)
    _plain_projection_kernel[(v.shape[0],)](v, out, T, BLOCK_T=max(2, triton.next_power_of_2(T)))
    want = solvers.project_simplex(v)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-15 * max(1.0, v.abs().max().item()))


@runs_triton
@pytest.mark.parametrize("c,rescale", [(0.5, True), (0.4, True), (0.4, False)])
@pytest.mark.parametrize("T", [1, 2, 5, 8])
def test_iterates_equal_the_tensor_program(T, c, rescale):
    """float64, well conditioned, 12 steps: before the objective's differences come down to rounding, where an
    accept decision may go either way (the Jacobi-scaled solve gets there in ~20 at T=8), both programs take the
    same steps (c = 0.4: c is exact in float64)."""
    M = gramian("random", T, seed=T)
    want = weightings.cagrad(M, c=c, rescale=rescale, iterations=12, fused=False)
    got = weightings.cagrad(M, c=c, rescale=rescale, iterations=12, fused=True)
    assert got.dtype == M.dtype and got.shape == (T,)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


@runs_triton
@pytest.mark.parametrize("kind", ["opposite", "zero_row", "graded", "all_zero", "huge"])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_degenerate_solves_reach_the_tensor_programs_objective(kind, T):
    """Where rounding parts the trajectories (flat directions, accept decisions at rounding level) the weights may
    differ (w's scale λ = radius/|g_w| is arbitrary as |g_w| → 0), the objective of the solution does not."""
    M = gramian(kind, T, seed=20 + T)
    want = weightings.cagrad(M, iterations=60, fused=False)
    got = weightings.cagrad(M, iterations=60, fused=True)
    assert torch.isfinite(got).all()
    assert_same_objective(M, got, want, rtol=1e-9)


@runs_triton
@pytest.mark.parametrize("T,dtype", [(5, torch.float32), (40, torch.float32), (64, torch.float32),
                                     (triton_solvers.MAX_TASKS_FLOAT64_CAGRAD, torch.float64)])
@pytest.mark.parametrize("kind", ["random", "graded"])
def test_many_tasks_and_float32(T, dtype, kind):
    M = gramian(kind, T, dtype=dtype, seed=T)
    want = weightings.cagrad(M, iterations=40, fused=False)
    got = weightings.cagrad(M, iterations=40, fused=True)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert_same_objective(M, got, want, rtol=1e-9 if dtype == torch.float64 else 2e-6)
    assert_same_objective(M, got, weightings.cagrad(M.double(), iterations=40, fused=False),
                          rtol=1e-9 if dtype == torch.float64 else 2e-6)


@runs_triton
@pytest.mark.parametrize("kind", ["random", "conflicting", "skewed"])
def test_fused_cagrad_matches_scipy(kind):
    """The default 300 steps, as test_mtl_weightings.test_cagrad_matches_scipy checks the tensor program."""
    from scipy import optimize

    G = torch.randn(4, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if kind == "conflicting":
        G[1] = -0.7 * G[0] + 0.05 * G[1]
    elif kind == "skewed":
        G[0] *= 1e3
    M = (G @ G.T).to(DEVICE)
    Mn = M.cpu().numpy()
    T, c = 4, 0.5
    b = np.full(T, 1.0 / T)
    radius = c * np.sqrt(Mn.mean() + 1e-8) + 1e-8
    fun = lambda x: x @ Mn @ b + radius * np.sqrt(x @ Mn @ x + 1e-8)  # noqa: E731
    best = min((optimize.minimize(fun, start, method="SLSQP", bounds=[(0, 1)] * T,
                                  constraints=({"type": "eq", "fun": lambda x: x.sum() - 1},),
                                  options={"ftol": 1e-14, "maxiter": 1000})
                for start in [b, *np.eye(T)[:3]]), key=lambda r: r.fun)
    w = weightings.cagrad(M, c=c, fused=True)
    assert objective(M, solution(w, c)) <= best.fun + 1e-5 * max(1.0, abs(best.fun))
    lam = radius / (np.sqrt(max(best.x @ Mn @ best.x, 0)) + 1e-8)
    want = (b + lam * best.x) / (1 + c * c)
    d_got, d_want = w.cpu().numpy() @ G.numpy(), want @ G.numpy()
    assert np.linalg.norm(d_got - d_want) <= 2e-3 * np.linalg.norm(d_want)


def test_fused_cagrad_refuses_what_one_program_does_not_hold():
    limit = triton_solvers.MAX_TASKS_FLOAT64_CAGRAD
    assert triton_solvers.cagrad_applies(torch.eye(limit, dtype=torch.float64))
    assert not triton_solvers.cagrad_applies(torch.eye(limit + 1, dtype=torch.float64))
    assert triton_solvers.cagrad_applies(torch.eye(triton_solvers.MAX_TASKS))
    assert not triton_solvers.cagrad_applies(torch.eye(triton_solvers.MAX_TASKS + 1))
    assert not triton_solvers.cagrad_applies(torch.eye(4, dtype=torch.float16))
    with pytest.raises(ValueError, match=f"at most {triton_solvers.MAX_TASKS} tasks in float32 \\({limit} in "
                                         f"float64\\); got {limit + 1} in torch.float64"):
        weightings.cagrad(torch.eye(limit + 1, dtype=torch.float64), fused=True)
    with pytest.raises(ValueError, match="fused cagrad"):
        weightings.cagrad(torch.eye(3, dtype=torch.float16), fused=True)


def test_dispatch_fuses_on_cuda_only_without_a_graph_through_M(monkeypatch):
    """fused=None: the tensor program on the CPU and whenever autograd records through M (it is differentiable,
    the kernel is not); the kernel on CUDA otherwise."""
    calls = []
    monkeypatch.setattr(triton_solvers, "cagrad", lambda M, *args: calls.append(M) or torch.zeros_like(M[0]))
    M = gramian("random", 3).cpu().requires_grad_()
    weightings.cagrad(M, iterations=3).sum().backward()
    assert M.grad is not None and not calls
    if torch.cuda.is_available():
        Mc = M.detach().cuda().requires_grad_()
        weightings.cagrad(Mc, iterations=3)
        assert not calls
        with torch.no_grad():
            weightings.cagrad(Mc, iterations=3)
        weightings.cagrad(Mc.detach(), iterations=3)
        assert len(calls) == 2
        weightings.cagrad(torch.eye(triton_solvers.MAX_TASKS + 1, device="cuda"), iterations=3)
        assert len(calls) == 2
