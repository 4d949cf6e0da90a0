"""Per-task gradient aggregation from the Gramian (DESIGN.md §2–3).

    M = gramian(G)            one pass over G [T, P]
    w = weights(M, method)    a tiny on-device solve, no host sync
    d = combine(G, w)         one more pass: wᵀG
    aggregate(G, method) = combine(G, weights(gramian(G), method))

See ``weightings`` for each method's definition and scale convention.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .gramian import combine, combine_blocks, gramian, gramian_blocks
from .loss_weighting import DynamicWeightAverage, GradNorm, UncertaintyWeighting
from .per_task_grads import OneBackward, autograd_gradients, replicate
from .training import backward_aggregated
from .weightings import WEIGHTINGS

METHODS = tuple(WEIGHTINGS)
__all__ = ["METHODS", "DynamicWeightAverage", "GradNorm", "OneBackward", "UncertaintyWeighting", "aggregate",
           "autograd_gradients", "backward_aggregated", "combine", "combine_blocks", "gramian", "gramian_blocks",
           "raise_if_nonfinite", "replicate", "weights"]


# Not traced by torch.compile: the solvers are fixed-iteration loops (hundreds of steps on a T×T matrix), which
# dynamo would unroll into graphs that take minutes to compile (upgrad under inductor: over 400 s) for work that
# is microseconds. Compiled code calls this eagerly instead; a CUDA graph captured by hand still holds it.
@torch.compiler.disable
def weights(M: Tensor, method: str, **kwargs) -> Tensor:
    """The task weights w [T] of ``method`` from the Gramian M [T, T]."""
    if method not in WEIGHTINGS:
        raise ValueError(f"unknown aggregation method {method!r}; methods: {', '.join(METHODS)}")
    if not isinstance(M, Tensor) or M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"the Gramian must be a square [T, T] tensor, got "
                         f"{tuple(M.shape) if isinstance(M, Tensor) else type(M).__name__}")
    return WEIGHTINGS[method](M, **kwargs)


def raise_if_nonfinite(M: Tensor) -> None:
    """Raise ValueError naming the tasks whose gradients hold NaN or Inf (visible in their Gramian rows).
    One host synchronisation on a T×T tensor; skip it (check_finite=False) inside a captured CUDA graph."""
    bad = ~torch.isfinite(M.diagonal())                 # M_tt = |g_t|² is non-finite iff g_t is (or overflows)
    if bool(bad.any()) or not bool(torch.isfinite(M).all()):
        bad = bad if bool(bad.any()) else torch.ones_like(bad)
        raise ValueError(f"the gradients of task(s) {bad.nonzero().flatten().tolist()} contain NaN or Inf (or "
                         f"are so large that their {M.dtype} Gramian overflows); refusing to aggregate them into .grad")


def aggregate(G: Tensor, method: str = "mean", *, backend: str = "auto", check_finite: bool = True,
              return_weights: bool = False, **kwargs):
    """wᵀG with w = ``method``'s weighting of the Gramian of G [T, P]; returns [P] (and w if asked)."""
    M = gramian(G, backend=backend)
    if check_finite:
        raise_if_nonfinite(M)
    w = weights(M, method, **kwargs)
    out = combine(G, w.to(M.dtype), backend=backend)
    return (out, w) if return_weights else out
