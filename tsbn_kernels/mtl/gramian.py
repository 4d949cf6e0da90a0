"""The two passes over the per-task gradients G [T, P]: the Gramian G·Gᵀ and the combination wᵀ·G.

Both accumulate in float32 (float64 for float64 input) and are deterministic: the Gramian is a fixed-order
sum of per-chunk partial Gramians, whatever the thread or SM count. Backends, named as the norms' are: "cpu" (the
compiled CPU kernels of csrc/cpu/gramian_cpu.cpp: one pass each, OpenMP), "eager" (plain PyTorch, per-chunk BLAS;
cuBLAS on CUDA), "triton" (one pass split along P filling the GPU; on CPU tensors under TRITON_INTERPRET=1),
"auto" (cpu on the CPU, triton on CUDA, eager where neither is available).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

from ..reference import accumulation_dtype

# Columns per partial Gramian on the eager path: a [T, CHUNK] slice stays in L2 while BLAS multiplies it.
CHUNK = 1 << 16
# On the CPU the C++ Gramian's AVX2 build beats per-chunk BLAS at every T measured (2-core EPYC, P = 1e7,
# 2026-12-02: T=3 7–10 ms vs 17–25 ms, T=16 62–74 ms vs 75–104 ms, T=40 263–268 ms vs 355–385 ms), and its AVX-512
# build is wider still. Its baseline build, narrower than BLAS's own vector kernels, is kept to few tasks, where
# the pass is bound by memory.
CPP_GRAMIAN_MAX_TASKS_BASELINE = 8


def _check_matrix(G: object, name: str = "G") -> Tensor:
    if not isinstance(G, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [T, P], got {type(G).__name__}")
    if G.dim() != 2:
        raise ValueError(f"{name} must be 2-D [T, P] (one row of gradients per task), got shape {tuple(G.shape)}")
    if G.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {G.dtype}")
    if G.shape[0] < 1:
        raise ValueError(f"{name} needs at least one task row, got shape {tuple(G.shape)}")
    if G.shape[1] < 1:
        raise ValueError(f"{name} has no parameters (P = 0): nothing to aggregate")
    return G


def _cpp_available() -> bool:
    from .. import _extension

    return _extension.has_op("gramian")


def _resolve(backend: str, device: torch.device) -> str:
    return _choose(backend, device.type)


# Plain Python over constants (and lazy imports): torch.compile evaluates it once at trace time.
@torch.compiler.assume_constant_result
def _choose(backend: str, device_type: str) -> str:
    if backend not in ("auto", "cpu", "eager", "triton"):
        raise ValueError(f"backend must be 'auto', 'cpu', 'eager' or 'triton', got {backend!r}")
    if backend == "auto":
        if device_type == "cuda" and _triton_available():
            return "triton"
        if device_type == "cpu" and _cpp_available():
            return "cpu"
        return "eager"
    if backend == "cpu" and (device_type != "cpu" or not _cpp_available()):
        raise ValueError("backend='cpu' needs CPU tensors and the compiled extension tsbn_kernels._C")
    if backend == "triton" and not _triton_available():
        raise ValueError("backend='triton' needs triton (and a GPU, or TRITON_INTERPRET=1 for CPU tensors)")
    if backend == "triton" and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1")
    return backend


@torch.compiler.assume_constant_result
def _cpp_gramian_is_vectorised() -> bool:
    from .. import _extension

    return _extension.cpu_isa() in ("avx2", "avx512")


def _triton_available() -> bool:
    try:
        from . import triton_gramian  # noqa: F401
    except ImportError:
        return False
    return True


def gramian(G: Tensor, *, backend: str = "auto") -> Tensor:
    """G·Gᵀ of the per-task gradients G [T, P]: [T, T], float32 (float64 for float64 G)."""
    G = _check_matrix(G)
    chosen = _resolve(backend, G.device)
    if backend == "auto" and chosen == "cpu" and G.shape[0] > CPP_GRAMIAN_MAX_TASKS_BASELINE \
            and not _cpp_gramian_is_vectorised():
        chosen = "eager"
    if chosen == "triton":
        from .triton_gramian import triton_gramian

        return _TritonGramian.apply(G, triton_gramian) if _needs_graph(G) else triton_gramian(G)
    if chosen == "cpu":
        return torch.ops.tsbn.gramian(G)
    return _torch_gramian(G)


def _torch_gramian(G: Tensor) -> Tensor:
    acc = accumulation_dtype(G.dtype)
    out = torch.zeros(G.shape[0], G.shape[0], dtype=acc, device=G.device)
    for start in range(0, G.shape[1], CHUNK):
        block = G[:, start:start + CHUNK].to(acc)
        out += block @ block.T
    return out


def combine(G: Tensor, w: Tensor, *, backend: str = "auto") -> Tensor:
    """wᵀ·G: the aggregated gradient [P] (G's dtype), accumulated in float32."""
    G = _check_matrix(G)
    w = _check_weights(w, G)
    chosen = _resolve(backend, G.device)
    if chosen == "triton":
        from .triton_gramian import triton_combine

        return _TritonCombine.apply(G, w, triton_combine) if _needs_graph(G, w) else triton_combine(G, w)
    if chosen == "cpu":
        return torch.ops.tsbn.combine(G, w)
    acc = accumulation_dtype(G.dtype)
    if G.dtype == acc:
        return w.to(acc) @ G
    out = torch.empty(G.shape[1], dtype=G.dtype, device=G.device)
    for start in range(0, G.shape[1], CHUNK):
        out[start:start + CHUNK] = (w.to(acc) @ G[:, start:start + CHUNK].to(acc)).to(G.dtype)
    return out


def _needs_graph(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def gramian_backward(G: Tensor, dM: Tensor) -> Tensor:
    """dL/dG of M = G·Gᵀ (in M's accumulation dtype) for every backend of gramian: (dM + dMᵀ)·G."""
    return ((dM + dM.T) @ G.to(dM.dtype)).to(G.dtype)


def combine_backward(G: Tensor, w: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """dL/dG and dL/dw of wᵀ·G for every backend of combine."""
    acc = accumulation_dtype(G.dtype)
    return (torch.outer(w.to(acc), grad.to(acc)).to(G.dtype), (G.to(acc) @ grad.to(acc)).to(w.dtype))


# The Triton launchers are plain functions that autograd cannot see through; these give them the same backward
# as the compiled ops (registered in _extension) and the eager path, so that differentiating through an
# aggregation (meta-learning, a loss on the Gramian) works on every backend instead of silently dropping the graph.
class _TritonGramian(torch.autograd.Function):
    @staticmethod
    def forward(ctx, G, launch):
        ctx.save_for_backward(G)
        return launch(G)

    @staticmethod
    def backward(ctx, dM):
        return gramian_backward(ctx.saved_tensors[0], dM), None


class _TritonCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, G, w, launch):
        ctx.save_for_backward(G, w)
        return launch(G, w)

    @staticmethod
    def backward(ctx, grad):
        return (*combine_backward(*ctx.saved_tensors, grad), None)


def _check_weights(w: object, G: Tensor) -> Tensor:
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a torch.Tensor of {G.shape[0]} task weights, got {type(w).__name__}")
    if w.shape != (G.shape[0],):
        raise ValueError(f"w must have shape ({G.shape[0]},), one weight per task row of G, got {tuple(w.shape)}")
    if w.device != G.device:
        raise ValueError(f"w is on {w.device} but G is on {G.device}")
    return w


def gramian_blocks(blocks: Sequence[Tensor], *, backend: str = "auto") -> Tensor:
    """The Gramian of the concatenation of per-parameter gradient blocks, each [T, *shape], without
    concatenating them: the sum of the blocks' Gramians, in block order."""
    if not blocks:
        raise ValueError("gramian_blocks needs at least one gradient block")
    flat = [b.reshape(b.shape[0], -1) for b in blocks]
    num_tasks = flat[0].shape[0]
    if any(f.shape[0] != num_tasks for f in flat):
        raise ValueError(f"every block needs the same leading task dimension, got {[f.shape[0] for f in flat]}")
    total = None
    for f in flat:
        if f.shape[1] == 0:
            continue
        part = gramian(f, backend=backend)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("the gradient blocks hold no parameters (P = 0)")
    return total


def combine_blocks(blocks: Sequence[Tensor], w: Tensor, *, backend: str = "auto") -> list[Tensor]:
    """wᵀ·G for each block [T, *shape]: the aggregated gradient of each parameter, shaped like it."""
    # An empty block (a parameter with no elements) aggregates to an empty gradient, as gramian_blocks skips it.
    return [combine(b.reshape(b.shape[0], -1), w, backend=backend).reshape(b.shape[1:]) if b[0].numel()
            else b.new_zeros(b.shape[1:]) for b in blocks]
