"""Gradient aggregation: the fused Gramian path against a LibMTL-style eager PCGrad loop.

"gramian_combine": one pass for G·Gᵀ plus one for wᵀG (ideal bytes 2·T·P·s + P·s) against unchunked torch
matmuls. "aggregate": aggregate(G, method) for every method, and the eager PCGrad loop of LibMTL (T² full-length
dot products, each read back to the host to decide the projection).
"""
from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.conftest import DEVICE
from benchmarks.shapes import aggregation_cases
from tsbn_kernels import _extension, mtl

GRAMIAN_BACKENDS = ["eager"] + (["triton"] if DEVICE == "cuda" else ["cpu"] if _extension.has_op("gramian") else [])


@functools.lru_cache(maxsize=1)
def gradients(T: int, P: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(0)
    G = torch.randn(T, P, generator=g)
    G[1::2] -= 0.5 * G[0]          # some conflicting rows, so PCGrad projects
    return G.to(DEVICE)


def libmtl_pcgrad(G: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    projected = G.clone()
    for i in range(G.shape[0]):
        for j in torch.randperm(G.shape[0], generator=generator).tolist():
            dot = torch.dot(projected[i], G[j])
            if dot < 0:                                   # a host sync per pair, as in LibMTL
                projected[i] -= dot * G[j] / G[j].norm().pow(2)
    return projected.sum(0)


def ids(case):
    return f"T{case[0]}-P{case[1]:.0e}"


@pytest.mark.parametrize("contender", GRAMIAN_BACKENDS + ["unchunked_matmul"])
@pytest.mark.parametrize("case", aggregation_cases(), ids=ids)
def test_gramian_combine(benchmark, measure, case, contender):
    T, P = case
    G = gradients(T, P)
    w = torch.full((T,), 1.0 / T, device=DEVICE)
    if contender == "unchunked_matmul":
        def step():
            return (G @ G.T), w @ G
    else:
        def step():
            return mtl.gramian(G, backend=contender), mtl.combine(G, w, backend=contender)
    measure(benchmark, step, bytes_moved=(2 * T * P + P) * G.element_size(),
            group=f"gramian_combine/{ids(case)}/float32", contender=contender, ours=contender != "unchunked_matmul")


@pytest.mark.parametrize("contender", list(mtl.METHODS) + ["libmtl_loop"])
@pytest.mark.parametrize("case", aggregation_cases(), ids=ids)
def test_aggregate(benchmark, measure, case, contender):
    T, P = case
    G = gradients(T, P)
    if contender == "libmtl_loop":
        generator = torch.Generator().manual_seed(0)

        def step():
            return libmtl_pcgrad(G, generator)
    elif contender == "pcgrad":
        generator = torch.Generator(device=DEVICE).manual_seed(0)

        def step():
            return mtl.aggregate(G, "pcgrad", generator=generator)
    else:
        def step():
            return mtl.aggregate(G, contender)
    slow = contender == "libmtl_loop" and T > 8 and DEVICE == "cpu"   # ~T² full passes: one timed round
    measure(benchmark, step, bytes_moved=(2 * T * P + P) * G.element_size(),
            group=f"aggregate/{ids(case)}/float32", rounds=(1, 0) if slow else None, contender=contender,
            ours=contender != "libmtl_loop", graph=contender != "libmtl_loop")


SOLVER_METHODS = ("mgda", "upgrad", "dualproj", "cagrad")


@pytest.mark.parametrize("contender", ["auto", "tensor_program"] if DEVICE == "cuda" else ["auto"])
@pytest.mark.parametrize("method", SOLVER_METHODS)
@pytest.mark.parametrize("T", sorted({case[0] for case in aggregation_cases()}))
def test_weights(benchmark, measure, monkeypatch, T, method, contender):
    """The iterative weightings alone on a T×T Gramian: on CUDA "auto" is one Triton launch per solve
    (mtl/triton_solvers.py), "tensor_program" the same solver as hundreds of small kernels a solve. Timed with
    events, not a CUDA graph: a training step outside a graph pays every launch."""
    g = torch.Generator(device="cpu").manual_seed(T)
    rows = torch.randn(T, 256, generator=g) * torch.logspace(0, 1, T).unsqueeze(1)   # norms spread 1..10
    M = (rows @ rows.T).to(DEVICE)
    if contender == "tensor_program":
        from tsbn_kernels.mtl import triton_solvers

        monkeypatch.setattr(triton_solvers, "applies", lambda *args: False)
        monkeypatch.setattr(triton_solvers, "cagrad_applies", lambda *args: False)

    def step():
        return mtl.weights(M, method)
    measure(benchmark, step, bytes_moved=M.numel() * M.element_size(), group=f"weights/T{T}/float32",
            contender=f"{method}_{contender}", ours=True, graph=False)
