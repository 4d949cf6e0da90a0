"""Gramian and combination against float64 matmul, on every backend available here, and their bad inputs."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tsbn_kernels import mtl

from tsbn_kernels import _extension  # noqa: E402

BACKENDS = (["eager"] + (["cpu"] if _extension.has_op("gramian") and not torch.cuda.is_available() else [])
            + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available() else []))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rows(T, P, dtype=torch.float32, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, P, generator=g, dtype=torch.float64) + offset).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 1e-5),
                                       (torch.float16, 1e-5)])
@pytest.mark.parametrize("T,P", [(1, 7), (3, 1000), (5, 777), (17, 300)])
def test_gramian_and_combine(backend, dtype, tol, T, P):
    G = rows(T, P, dtype, seed=T * P)
    G64 = G.double()
    M = mtl.gramian(G, backend=backend)
    assert M.shape == (T, T) and M.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = G64 @ G64.T
    torch.testing.assert_close(M.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    w = torch.randn(T, generator=torch.Generator().manual_seed(1), dtype=M.dtype).to(DEVICE)
    d = mtl.combine(G, w, backend=backend)
    assert d.shape == (P,) and d.dtype == dtype
    want_d = w.double() @ G64
    out_tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(d.double(), want_d, rtol=out_tol, atol=out_tol * want_d.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_and_non_contiguous(backend):
    big = rows(4, 3000, torch.float32, seed=3, offset=5.0)
    G = big[:, ::2]
    assert torch.equal(mtl.gramian(G, backend=backend), mtl.gramian(G, backend=backend))
    torch.testing.assert_close(mtl.gramian(G, backend=backend).double(), G.double() @ G.double().T, rtol=1e-5,
                               atol=1e-2)


def test_blocks_equal_concatenation():
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(3, 4, 5, generator=g), torch.randn(3, 7, generator=g), torch.randn(3, 2, 2, 2, generator=g)]
    flat = torch.cat([b.reshape(3, -1) for b in blocks], dim=1)
    torch.testing.assert_close(mtl.gramian_blocks(blocks), mtl.gramian(flat))
    w = torch.tensor([0.5, -1.0, 2.0])
    parts = mtl.combine_blocks(blocks, w)
    assert [p.shape for p in parts] == [b.shape[1:] for b in blocks]
    torch.testing.assert_close(torch.cat([p.flatten() for p in parts]), mtl.combine(flat, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gramian_and_combine_are_differentiable(backend):
    """Differentiating through an aggregation (a loss on the Gramian, meta-learned weights) works on every backend:
    the fused kernels carry the same backward as the torch path instead of silently dropping the graph."""
    G = rows(3, 41, torch.float64, seed=4).requires_grad_()
    w = torch.rand(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g: mtl.gramian(g, backend=backend), (G,))
    assert torch.autograd.gradcheck(lambda g, v: mtl.combine(g, v, backend=backend), (G, w))
    G32 = G.detach().float().requires_grad_()
    (mtl.gramian(G32, backend=backend).diagonal().sum() + mtl.combine(G32, w.detach().float(), backend=backend)
     .square().sum()).backward()
    want = 2 * G32.detach() + 2 * torch.outer(w.detach().float(), w.detach().float() @ G32.detach())
    torch.testing.assert_close(G32.grad, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not _extension.has_op("gramian"), reason="extension not built")
def test_cpp_ops_opcheck_and_errors():
    G = rows(3, 5000, torch.float32)
    torch.library.opcheck(torch.ops.tsbn.gramian.default, (G,))
    torch.library.opcheck(torch.ops.tsbn.combine.default, (G, torch.randn(3)))
    with pytest.raises(ValueError, match="2-D"):
        torch.ops.tsbn.gramian(torch.randn(4))
    with pytest.raises(ValueError, match=r"w must have shape \(3,\)"):
        torch.ops.tsbn.combine(G, torch.randn(4))


CPP = pytest.mark.skipif(not _extension.has_op("gramian") or torch.cuda.is_available(),
                         reason="the C++ CPU kernels are not built (or CUDA tensors are in use)")


@CPP
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-12), (torch.bfloat16, 2e-6)])
@pytest.mark.parametrize("T", [2, 4, 6, 7, 9, 40])
def test_cpp_gramian_register_blocks_across_chunks(dtype, tol, T):
    """Every (rows, columns) edge of the 2 × 4 register blocks, over P spanning several 2048-column chunks and a
    ragged last one, |mean| >> std: against float64."""
    G = rows(T, 2 * 2048 + 37, dtype, seed=T, offset=3.0)
    G64 = G.double()
    want = G64 @ G64.T
    got = torch.ops.tsbn.gramian(G)
    assert torch.equal(got, got.T)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


@CPP
def test_cpp_gramian_independent_of_thread_count():
    """Chunk partials are summed in fixed groups and order: the same bits at 1 and 2 threads, over enough
    columns for several groups."""
    G = rows(5, 40 * 2048 + 11, torch.float32, seed=5, offset=1.0)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.tsbn.gramian(G)
        torch.set_num_threads(2)
        two = torch.ops.tsbn.gramian(G)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


@CPP
@given(T=st.integers(1, 12), P=st.integers(1, 5000), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_property_cpp_gramian_and_combine(T, P, seed):
    G = rows(T, P, torch.float32, seed=seed)
    G64 = G.double()
    want = G64 @ G64.T
    torch.testing.assert_close(torch.ops.tsbn.gramian(G).double(), want, rtol=1e-5,
                               atol=1e-5 * want.abs().max().item())
    w = torch.randn(T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    want_d = w @ G64
    torch.testing.assert_close(torch.ops.tsbn.combine(G, w.float()).double(), want_d, rtol=1e-5,
                               atol=1e-5 * want_d.abs().max().item())


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"2-D \[T, P\]"):
        mtl.gramian(torch.randn(3))
    with pytest.raises(ValueError, match="P = 0"):
        mtl.gramian(torch.randn(3, 0))
    with pytest.raises(TypeError, match="float16, bfloat16"):
        mtl.gramian(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"w must have shape \(3,\)"):
        mtl.combine(torch.randn(3, 5), torch.ones(2))
    with pytest.raises(ValueError, match="backend must be"):
        mtl.gramian(torch.randn(2, 3), backend="cuda")
    with pytest.raises(ValueError, match="unknown aggregation method 'pcgard'"):
        mtl.aggregate(torch.randn(2, 3), "pcgard")
    G = torch.randn(3, 10)
    G[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"task\(s\) \[1\] contain NaN or Inf"):
        mtl.aggregate(G, "pcgrad")
    G[1, 4] = float("inf")
    with pytest.raises(ValueError, match=r"task\(s\) \[1\]"):
        mtl.aggregate(G, "mean")


def test_combine_blocks_takes_the_empty_blocks_gramian_blocks_skips():
    blocks = [torch.randn(3, 4, 2), torch.randn(3, 0), torch.randn(3, 5)]
    w = torch.tensor([0.2, 0.3, 0.5])
    assert mtl.gramian_blocks(blocks).shape == (3, 3)
    out = mtl.combine_blocks(blocks, w)
    assert [o.shape for o in out] == [(4, 2), (0,), (5,)]
    torch.testing.assert_close(out[0], torch.einsum("t,tij->ij", w, blocks[0]))
