"""nn.MultiheadAttention's forward as OneBackward runs it during a capture.

torch's module calls F.multi_head_attention_forward, which uses the projection weights inside one function (or,
in inference, the fused torch._native_multi_head_attention): no nn.Linear forward runs, so OneBackward could not
see the projections' inputs and output gradients it needs to split their weight gradients by task. For the
duration of a capture OneBackward gives each captured nn.MultiheadAttention this functional forward instead: the
same computation as torch's slow path (F.multi_head_attention_forward, checked against torch's own forward once
per module and configuration), laid out batch-first, with every use of a parameter going through ``project``
(the q/k/v in-projections and out_proj: rows of a weight times the input) or ``extend`` (bias_k/bias_v appended
to each sample's keys/values), which record what the split needs.

Attention mixes tokens within a sample only, never samples, so per-sample (and per-task-block) gradients of
every parameter are well defined. Batched inputs only: an unbatched (2-D) query has no batch dimension to split.
"""
from __future__ import annotations

import inspect
import math
import warnings
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# project(mha, label, x, weight, w_start, bias, b_start, rows) -> x @ weight[w_start:w_start + rows]ᵀ + bias[...]
Project = Callable[[nn.Module, str, Tensor, Tensor, int, "Tensor | None", int, int], Tensor]
# extend(mha, label, param [1, 1, E], batch) -> param as [batch, 1, E]
Extend = Callable[[nn.Module, str, Tensor, int], Tensor]


def plain_project(mha, label, x, weight, w_start, bias, b_start, rows):
    w = weight if w_start == 0 and rows == weight.shape[0] else weight.narrow(0, w_start, rows)
    b = None if bias is None else (bias if b_start == 0 and rows == bias.shape[0] else bias.narrow(0, b_start, rows))
    return F.linear(x, w, b)


def plain_extend(mha, label, param, batch):
    return param.expand(batch, 1, param.shape[-1])


def _canonical_mask(mask: Tensor | None, name: str, target: torch.dtype, other: Tensor | None = None,
                    other_name: str = "") -> Tensor | None:
    """torch's mask convention: bool (True = not allowed to attend) becomes an additive float mask of -inf/0 in
    the query's dtype; a float mask is added as it is."""
    if mask is None:
        return None
    if mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")
    if other is not None and mask.dtype != other.dtype:
        warnings.warn(f"Support for mismatched {name} and {other_name} is deprecated. Use same type for both "
                      "instead.", stacklevel=4)
    if mask.dtype == torch.bool:
        mask = torch.zeros_like(mask, dtype=target).masked_fill_(mask, float("-inf"))
    return mask


def unsupported(mha: nn.Module) -> str | None:
    """Why OneBackward cannot run this module's forward in its functional form (None: it can)."""
    if type(mha).forward is not nn.MultiheadAttention.forward:
        return f"{type(mha).__name__} overrides nn.MultiheadAttention.forward (how it uses its weights is unknown)"
    if "forward" in vars(mha):
        return "its forward is replaced on the instance (how it uses its weights is unknown)"
    return None


def mha_forward(mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True, attn_mask: Tensor | None = None,
                average_attn_weights: bool = True, is_causal: bool = False, *, project: Project = plain_project,
                extend: Extend = plain_extend, dropout: float | None = None) -> tuple[Tensor, Tensor | None]:
    """``mha(query, key, value, ...)`` as torch computes it (slow path), with the parameters used through
    ``project`` and ``extend``. ``dropout`` overrides the module's (the check against torch's forward runs both
    without)."""
    if query.is_nested or key.is_nested or value.is_nested:
        raise ValueError("nn.MultiheadAttention got a NestedTensor (nn.TransformerEncoder's inference fast path "
                         "makes one from src_key_padding_mask when nothing requires grad): OneBackward cannot split "
                         "its gradients; build the encoder with enable_nested_tensor=False")
    if query.dim() != 3:
        raise ValueError(f"nn.MultiheadAttention got an unbatched ({query.dim()}-D) query: OneBackward splits "
                         "gradients along the batch dimension, which an unbatched input does not have")
    if key.dim() != 3 or value.dim() != 3:
        raise AssertionError("For batched (3-D) `query`, expected `key` and `value` to be 3-D but found "
                             f"{key.dim()}-D and {value.dim()}-D tensors respectively")
    if key_padding_mask is not None and key_padding_mask.dim() != 2:
        raise AssertionError("For batched (3-D) `query`, expected `key_padding_mask` to be `None` or 2-D but found "
                             f"{key_padding_mask.dim()}-D tensor instead")
    if attn_mask is not None and attn_mask.dim() not in (2, 3):
        raise AssertionError("For batched (3-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D but found "
                             f"{attn_mask.dim()}-D tensor instead")
    key_padding_mask = _canonical_mask(key_padding_mask, "key_padding_mask", query.dtype, attn_mask, "attn_mask")
    attn_mask = _canonical_mask(attn_mask, "attn_mask", query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None            # the hint alone, as torch hands it to scaled_dot_product_attention
    elif key_padding_mask is not None:
        is_causal = False           # the merged mask is no longer causal

    self_attention, shared_kv = query is key and key is value, key is value
    if not mha.batch_first:        # [L, B, E] → [B, L, E]: every recorded input then holds a sample's rows together
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    B, L, E = query.shape
    if E != mha.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {mha.embed_dim}, but got {E}")
    H = mha.num_heads
    head_dim = E // H
    bias = mha.in_proj_bias
    if mha._qkv_same_embed_dim:
        if key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        W = mha.in_proj_weight
        if self_attention:
            q, k, v = project(mha, "in_proj", query, W, 0, bias, 0, 3 * E).chunk(3, dim=-1)
        elif shared_kv:
            q = project(mha, "in_proj[q]", query, W, 0, bias, 0, E)
            k, v = project(mha, "in_proj[kv]", key, W, E, bias, E, 2 * E).chunk(2, dim=-1)
        else:
            q = project(mha, "in_proj[q]", query, W, 0, bias, 0, E)
            k = project(mha, "in_proj[k]", key, W, E, bias, E, E)
            v = project(mha, "in_proj[v]", value, W, 2 * E, bias, 2 * E, E)
    else:
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                                 f"{value.shape[:2]}")
        q = project(mha, "q_proj", query, mha.q_proj_weight, 0, bias, 0, E)
        k = project(mha, "k_proj", key, mha.k_proj_weight, 0, bias, E, E)
        v = project(mha, "v_proj", value, mha.v_proj_weight, 0, bias, 2 * E, E)
    S = k.shape[1]
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (L, S):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(L, S)}.")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.shape != (B * H, L, S):
            raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                               f"{(B * H, L, S)}.")
    if (mha.bias_k is None) != (mha.bias_v is None):
        raise AssertionError("bias_k and bias_v must both be set or both be None")
    if mha.bias_k is not None:                              # one more key/value per sample
        k = torch.cat([k, extend(mha, "bias_k", mha.bias_k, B)], dim=1)
        v = torch.cat([v, extend(mha, "bias_v", mha.bias_v, B)], dim=1)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    q = q.unflatten(-1, (H, head_dim)).transpose(1, 2)     # [B, H, L, head_dim]
    k = k.unflatten(-1, (H, head_dim)).transpose(1, 2)     # [B, H, S, head_dim]
    v = v.unflatten(-1, (H, head_dim)).transpose(1, 2)
    if mha.add_zero_attn:
        zeros = torch.zeros(B, H, 1, head_dim, dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros.to(v.dtype)], dim=2)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    S = k.shape[2]
    if attn_mask is not None:                               # [1 or B·H, L, S] → broadcastable [B, H, L, S]
        attn_mask = attn_mask.view(1, 1, L, S) if attn_mask.shape[0] == 1 else attn_mask.view(B, H, L, S)
    if key_padding_mask is not None:
        if key_padding_mask.shape[0] != B:
            raise AssertionError(f"Expected key_padded_mask.shape[0] to be {B}, but got {key_padding_mask.shape[0]}")
        if key_padding_mask.shape[1] != S:
            raise AssertionError(f"Expected key_padded_mask.shape[1] to be {S}, but got {key_padding_mask.shape[1]}")
        padding = key_padding_mask.view(B, 1, 1, S)
        attn_mask = padding if attn_mask is None else attn_mask + padding
    p = (mha.dropout if dropout is None else dropout) if mha.training else 0.0
    if need_weights:
        q3 = (q * math.sqrt(1.0 / head_dim)).reshape(B * H, L, head_dim)
        kt = k.reshape(B * H, S, head_dim).transpose(1, 2)
        if attn_mask is None:
            weights = torch.bmm(q3, kt)
        else:
            weights = torch.baddbmm(attn_mask.expand(B, H, L, S).reshape(B * H, L, S), q3, kt)
        weights = F.softmax(weights, dim=-1)
        if p > 0.0:
            weights = F.dropout(weights, p=p)
        out = torch.bmm(weights, v.reshape(B * H, S, head_dim)).view(B, H, L, head_dim)
        weights = weights.view(B, H, L, S)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, p, is_causal)
        weights = None
    out = project(mha, "out_proj", out.transpose(1, 2).reshape(B, L, E), mha.out_proj.weight, 0,
                  mha.out_proj.bias, 0, E)
    return (out if mha.batch_first else out.transpose(0, 1)), weights


_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
# The configurations of each module whose functional forward was checked against torch's.
_checked: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def _describe(t) -> tuple | None:
    return None if not isinstance(t, Tensor) else (t.dtype, t.dim(), t.device.type)


def check_once(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
    """``check_against_torch`` the first time this module runs in this configuration (the inputs' dtypes and
    ranks, which of them are the same tensor, the masks' kinds, the flags, autocast): two forwards without
    autograd, once."""
    bound = _SIGNATURE.bind(mha, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if not all(isinstance(a[name], Tensor) for name in ("query", "key", "value")) or a["query"].is_nested:
        return                                     # mha_forward raises about these itself
    device = a["query"].device.type
    key = (a["query"] is a["key"], a["key"] is a["value"], *map(_describe, (a["query"], a["key"], a["value"])),
           _describe(a["key_padding_mask"]), _describe(a["attn_mask"]), bool(a["need_weights"]),
           bool(a["average_attn_weights"]), bool(a["is_causal"]), torch.is_autocast_enabled(device),
           torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
    seen = _checked.setdefault(mha, set())
    if key not in seen:
        check_against_torch(mha, args, kwargs)
        seen.add(key)


def check_against_torch(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
    """Raise unless ``mha_forward`` gives torch's result for these inputs (torch's slow path, no dropout, no
    autograd): run once per module and configuration, it keeps a torch version whose MultiheadAttention
    computes something else from silently changing what a captured forward computes."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")             # the captured forward gives any warning itself
        saved, fast = mha.dropout, torch.backends.mha.get_fastpath_enabled()
        mha.dropout = 0.0
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            want = nn.MultiheadAttention.forward(mha, *args, **kwargs)
        finally:
            mha.dropout = saved
            torch.backends.mha.set_fastpath_enabled(fast)
        got = mha_forward(mha, *args, **kwargs, dropout=0.0)
    for name, g, w in zip(("output", "attention weights"), got, want):
        if (g is None) != (w is None) or g is not None and g.shape != w.shape:
            raise RuntimeError(f"OneBackward's functional nn.MultiheadAttention forward gives a {name} of another "
                               "shape than torch's; please report this (torch " + torch.__version__ + ")")
        if g is None:
            continue
        low = g.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(g.device.type)
        tolerance = 3e-2 if low else 1e-3 if g.dtype == torch.float32 else 1e-8
        finite = torch.isfinite(w)
        if not torch.equal(finite, torch.isfinite(g)):
            raise RuntimeError(f"OneBackward's functional nn.MultiheadAttention forward differs from torch's in "
                               f"which {name} are finite (torch {torch.__version__}); please report this")
        if finite.any():
            scale = float(w[finite].abs().max()) + 1e-30
            error = float((g[finite].to(w.dtype) - w[finite]).abs().max())
            if error > tolerance * max(scale, 1.0):
                raise RuntimeError(f"OneBackward's functional nn.MultiheadAttention forward differs from torch's "
                                   f"({name}: max error {error:.3g} at scale {scale:.3g}, torch "
                                   f"{torch.__version__}); please report this")
