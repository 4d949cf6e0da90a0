"""Loads the compiled extension ``tsbn_kernels._C`` (TORCH_LIBRARY ops in the ``tsbn`` namespace).

The package imports without it (the eager backend is plain PyTorch); backends built on compiled ops ask
``has_op`` before registering themselves.
"""
from __future__ import annotations

import functools
import warnings

import torch

from .reference import accumulation_dtype

try:
    from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
    LOAD_ERROR: str | None = None
except ImportError as exc:  # source checkout without a build: fine for the eager backend
    _C = None
    LOAD_ERROR = str(exc)


def is_built() -> bool:
    return _C is not None


@functools.cache
def has_op(name: str) -> bool:
    if _C is None:
        return False
    return hasattr(torch.ops.tsbn, name)


@functools.cache
def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA sources (a CUDAExtension build)."""
    if _C is None:
        return False
    try:
        return bool(torch.ops.tsbn.built_with_cuda())
    except (AttributeError, RuntimeError) as exc:  # an extension older than this query
        warnings.warn(f"tsbn_kernels._C cannot report its CUDA build: {exc}", stacklevel=2)
        return False


@functools.cache
def cpu_isa() -> str:
    """Which build of the C++ CPU kernels runs here: "avx512", "avx2" or "baseline" (csrc/cpu/cpu_isa.h); "none" without
    the extension."""
    if _C is None:
        return "none"
    return str(torch.ops.tsbn.cpu_isa()) if has_op("cpu_isa") else "baseline"


if _C is not None:
    @torch.library.register_fake("tsbn::task_counts")
    def _task_counts_fake(task_ids, num_tasks):
        return task_ids.new_empty(num_tasks + 2, dtype=torch.long)

    if has_op("gramian"):
        @torch.library.register_fake("tsbn::gramian")
        def _gramian_fake(G):
            return G.new_empty((G.shape[0], G.shape[0]), dtype=accumulation_dtype(G.dtype))

        @torch.library.register_fake("tsbn::combine")
        def _combine_fake(G, w):
            return G.new_empty((G.shape[1],))

        def _gramian_setup(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        # The formulas live with mtl's other autograd (mtl/gramian.py), imported when a backward first runs.
        def _gramian_autograd(ctx, dM):
            from .mtl.gramian import gramian_backward

            return gramian_backward(ctx.saved_tensors[0], dM)

        def _combine_setup(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        def _combine_autograd(ctx, grad):
            from .mtl.gramian import combine_backward

            return combine_backward(*ctx.saved_tensors, grad)

        torch.library.register_autograd("tsbn::gramian", _gramian_autograd, setup_context=_gramian_setup)
        torch.library.register_autograd("tsbn::combine", _combine_autograd, setup_context=_combine_setup)

    # Complete the compiled ops (fake impls, autograd) as soon as they exist, so that torch.ops.tsbn.* works
    # under torch.compile and opcheck even when called directly rather than through tsbn_kernels' API.
    if has_op("ts_bn_forward"):
        from .kernels import cpp_ts_batch_norm  # noqa: F401,E402
