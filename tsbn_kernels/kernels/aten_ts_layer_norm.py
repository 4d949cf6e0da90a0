"""Backend "cpu" of ts_layer_norm: ATen's fused layer_norm kernel without affine, then one fused multiply-add of
the sample's task gate and bias.

On the CPU that is two passes over the activations forward (ATen's kernel, then the addcmul) against the six
elementwise passes of the two-pass reference, and ATen's own fused backward; autograd, torch.compile,
torch.func and second derivatives come with the ATen ops. ATen's kernel accumulates half-precision inputs in
float32 and rounds its output to the input dtype, and the gate multiply rounds again: one rounding more than the
reference and the Triton kernel (both within the half-precision tolerance of the tests), for not converting the
activations to float32 and back — what F.layer_norm followed by a gate multiply costs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import dispatch
from ..reference import accumulation_dtype, gate_values, task_index


def ts_layer_norm(x: Tensor, weight, bias, *, task_ids, num_tasks, eps, gate) -> Tensor:
    """The dispatch contract of ``tsbn_kernels.dispatch`` on ATen's layer_norm."""
    params = weight if weight is not None else bias
    normalized_shape = tuple(params.shape[1:])
    y = F.layer_norm(x, normalized_shape, eps=eps)
    ids = task_index(task_ids, x.shape[0], num_tasks, x.device)
    # [B, 1, ..., 1, *normalized_shape]: the sample's task row, broadcast over its tokens.
    per_sample = (x.shape[0],) + (1,) * (x.dim() - 1 - len(normalized_shape)) + normalized_shape

    def rows(table: Tensor) -> Tensor:   # float32 parameters of a half-precision input: x's dtype, like autocast
        return table.to(x.dtype).index_select(0, ids).reshape(per_sample)

    a = gate_values(None if weight is None else weight.to(accumulation_dtype(x.dtype)), gate)
    if a is not None and bias is not None:
        y = torch.addcmul(rows(bias), y, rows(a))
    elif a is not None:
        y = y * rows(a)
    else:
        y = y + rows(bias)
    return y


dispatch.register("cpu", "ts_layer_norm", ts_layer_norm, ("cpu",))
