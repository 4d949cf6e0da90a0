"""Turn an existing (single- or hard-shared multi-task) model into a task-specific-norm model."""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from . import modules

_TARGETS: dict[type, type] = {
    nn.BatchNorm1d: modules.TSBatchNorm1d,
    nn.BatchNorm2d: modules.TSBatchNorm2d,
    nn.BatchNorm3d: modules.TSBatchNorm3d,
    nn.SyncBatchNorm: modules.TSBatchNorm,
}
GATE_INITS = ("normal", "copy")


def _target_class(bn: nn.Module) -> type | None:
    if isinstance(bn, nn.modules.batchnorm._BatchNorm) and isinstance(bn, nn.modules.lazy.LazyModuleMixin):
        # Left alone, it would turn into a plain nn.BatchNorm at its first forward and mix the tasks' statistics.
        raise ValueError(f"convert_batchnorm: {type(bn).__name__} is not initialised yet (its num_features is set "
                         "by its first forward): run the model once on an example batch, then convert it")
    for source, target in _TARGETS.items():
        if isinstance(bn, source):
            return target
    return None


def convert_batchnorm(module: nn.Module, num_tasks: int, gate: str = "sigmoid", bias: bool | None = None, *,
                      gate_init: str = "normal", backend: str = "auto", activation: str | None = None
                      ) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d and SyncBatchNorm in ``module`` by a task-specific layer.

    Returns the converted module (the module itself, changed in place, unless it is a BatchNorm), the
    way ``nn.SyncBatchNorm.convert_sync_batchnorm`` does. Every task starts as a copy of the original
    layer: running statistics and ``num_batches_tracked`` go to every task row, ``eps``, ``momentum``,
    ``affine``, ``track_running_stats``, device, dtype, training mode and ``requires_grad`` are kept.

    How the original weight γ and bias β initialise each task:
      - ``gate="none"``: weight_t = γ, bias_t = β. The converted model computes the same function as the
        original, task by task, up to float rounding (with ``bias=False`` β is dropped, and then it does not).
      - ``gate="sigmoid"``: the scale is sigmoid(w_t) ∈ (0, 1), so γ cannot always be kept.
        ``gate_init="normal"`` (default) draws w_t ~ N(0, 1) as the σBN paper does for training from
        scratch; ``gate_init="copy"`` sets w_t = logit(clamp(γ, 1e-3, 1 − 1e-3)), exact for 0 < γ < 1,
        for starting from a pretrained backbone. β is copied when the layer has a bias (``bias=True``)
        and dropped otherwise (σBN has no β by default).
    SyncBatchNorm becomes the any-rank ``TSBatchNorm`` with ``sync=True`` and its ``process_group``: in training
    under torch.distributed, task statistics are synchronised across processes (tsbn_kernels.sync_batch_norm).
    A norm module used in several places stays one layer, and norms that share (tie) a weight or bias Parameter
    share the converted one. A LazyBatchNorm that has not run yet raises a ValueError: convert after one forward pass.
    """
    if gate_init not in GATE_INITS:
        raise ValueError(f"convert_batchnorm: gate_init must be one of {GATE_INITS}, got {gate_init!r}")

    tied: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}

    def convert(m: nn.Module) -> nn.Module | None:
        target = _target_class(m)
        return None if target is None else _keep_ties(
            m, _convert_one(m, target, num_tasks, gate, bias, gate_init, backend, activation), tied)

    return _replace_modules(module, convert, {})


def _keep_ties(source: nn.Module, converted: nn.Module, tied: dict[int, tuple[nn.Parameter, nn.Parameter]]
               ) -> nn.Module:
    """Norms that share a weight or bias Parameter (tied across branches) still share it after conversion: the later
    ones take the task-specific Parameter made for the first, as convert_sync_batchnorm keeps the very Parameter."""
    for name in ("weight", "bias"):
        old, new = getattr(source, name, None), getattr(converted, name, None)
        if old is None or new is None:
            continue
        if id(old) in tied:
            setattr(converted, name, tied[id(old)][1])
        else:
            tied[id(old)] = (old, new)   # holding old keeps its id from being reused while the conversion runs
    return converted


def _replace_modules(module: nn.Module, convert: Callable[[nn.Module], nn.Module | None],
                     memo: dict[int, nn.Module]) -> nn.Module:
    """``convert(module)``, or, where that is None, ``module`` with its submodules replaced the same way, in place.
    A module reached more than once (used twice, or shared by two parents) becomes one converted module, so it
    stays one shared layer."""
    if id(module) in memo:
        return memo[id(module)]
    converted = convert(module)
    if converted is None:
        # _modules, not named_children(), which yields a module registered under two names only once.
        for name, child in list(module._modules.items()):
            if child is not None:
                new = _replace_modules(child, convert, memo)
                if new is not child:
                    setattr(module, name, new)
        converted = module
    memo[id(module)] = converted
    return converted


def _warn_if_frozen_random_gates(caller: str, weight: torch.Tensor, gate: str, gate_init: str) -> None:
    # One message text for every layer: Python shows it once, not once per norm of a frozen ResNet.
    if gate == "sigmoid" and gate_init == "normal" and not weight.requires_grad:
        warnings.warn(f"{caller}: a frozen norm (weight.requires_grad=False) with gate_init='normal' gets random "
                      "sigmoid gates that stay frozen, changing the pretrained function for good; pass "
                      "gate_init='copy' (gates = logit of γ) or gate='none' (γ copied), or unfreeze the gates",
                      UserWarning, stacklevel=4)


def _convert_one(bn: nn.Module, target: type, num_tasks: int, gate: str, bias: bool | None, gate_init: str,
                 backend: str, activation: str | None) -> nn.Module:
    reference_tensor = bn.weight if bn.weight is not None else bn.running_mean
    factory = {} if reference_tensor is None else {"device": reference_tensor.device,
                                                   "dtype": reference_tensor.dtype}
    # Buffers where the original has them, whatever its track_running_stats says: nn.BatchNorm reads its running
    # statistics in eval whenever they exist (track_running_stats set to False after construction only stops their
    # update) and uses batch statistics when they were set to None; the layer's forward follows the same rule.
    has_stats = bn.running_mean is not None and bn.running_var is not None
    ts = target(bn.num_features, num_tasks, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                track_running_stats=has_stats, gate=gate, bias=bias, activation=activation,
                backend=backend, **factory)
    ts.track_running_stats = bn.track_running_stats
    with torch.no_grad():
        if bn.affine:
            if gate == "none":
                ts.weight.copy_(bn.weight.expand_as(ts.weight))
            elif gate_init == "copy":
                ts.weight.copy_(torch.logit(bn.weight.clamp(1e-3, 1 - 1e-3)).expand_as(ts.weight))
            if ts.bias is not None:
                ts.bias.copy_(bn.bias.expand_as(ts.bias))
            ts.weight.requires_grad_(bn.weight.requires_grad)
            _warn_if_frozen_random_gates("convert_batchnorm", bn.weight, gate, gate_init)
            if ts.bias is not None:
                ts.bias.requires_grad_(bn.bias.requires_grad)
        if has_stats:
            # The statistics keep their own dtype (float32 statistics of a half-precision layer stay float32).
            ts.running_mean = bn.running_mean.detach().expand(ts.running_mean.shape).clone()
            ts.running_var = bn.running_var.detach().expand(ts.running_var.shape).clone()
            if bn.num_batches_tracked is not None:   # a tensor copy: no host sync, and works on meta tensors
                ts.num_batches_tracked.copy_(bn.num_batches_tracked.expand_as(ts.num_batches_tracked))
    if isinstance(bn, nn.SyncBatchNorm):
        ts.sync, ts.process_group = True, bn.process_group
    ts.train(bn.training)
    return ts


def convert_layernorm(module: nn.Module, num_tasks: int, gate: str = "sigmoid", bias: bool | None = None, *,
                      gate_init: str = "normal", backend: str = "auto") -> nn.Module:
    """Replace every ``nn.LayerNorm`` in ``module`` by a ``TSLayerNorm`` (TSσLN for transformers), in place, with
    the same initialisation rules as :func:`convert_batchnorm`: ``gate="none"`` copies γ (and β) to every task,
    so the converted model computes the original function; ``gate="sigmoid"`` draws the gate logits from N(0, 1)
    (``gate_init="normal"``) or sets them to logit(clamp(γ)) (``gate_init="copy"``; γ = 1 for a LayerNorm
without ``elementwise_affine``, whose converted layer gets gates too). β is kept when the result
    has a bias (``bias=None`` means: a bias for ``gate="none"``, none for ``gate="sigmoid"``). Samples are split by
    task along dim 0, so torch's transformer layers must be built with ``batch_first=True`` (ValueError otherwise)."""
    if gate_init not in GATE_INITS:
        raise ValueError(f"convert_layernorm: gate_init must be one of {GATE_INITS}, got {gate_init!r}")
    for name, m in module.named_modules():
        # A TSLayerNorm splits dim 0 by task; these layers' norms get [seq, batch, features] without batch_first,
        # so the tasks would be assigned sequence positions, silently.
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and not m.self_attn.batch_first \
                and any(isinstance(n, nn.LayerNorm) for n in m.modules()):
            raise ValueError(f"convert_layernorm: {name or 'the module'} ({type(m).__name__}) has batch_first=False: "
                             "its LayerNorms see [seq, batch, features], while a TSLayerNorm takes dim 0 as the "
                             "samples to split by task; build it with batch_first=True and feed [batch, seq, features]")

    tied: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}

    def convert(m: nn.Module) -> nn.Module | None:
        return _keep_ties(m, _convert_layer_norm(m, num_tasks, gate, bias, gate_init, backend), tied) \
            if isinstance(m, nn.LayerNorm) else None

    converted = _replace_modules(module, convert, {})
    for m in converted.modules():
        # nn.TransformerEncoderLayer takes a fused inference fast path that reads norm1/norm2.weight and .bias as
        # [D] tensors: with [T, D] gates it would fail or compute garbage; nn.TransformerEncoder would turn the
        # input into a nested tensor, which task-specific norms cannot split by task. These flags gate only those
        # fast paths; the layers' math is unchanged.
        if isinstance(m, nn.TransformerEncoderLayer) and isinstance(getattr(m, "norm1", None), modules.TSLayerNorm):
            m.activation_relu_or_gelu = False
        if isinstance(m, nn.TransformerEncoder) and any(isinstance(n, modules.TSLayerNorm) for n in m.modules()):
            m.use_nested_tensor = False
    return converted


def _convert_layer_norm(ln: nn.LayerNorm, num_tasks: int, gate: str, bias: bool | None, gate_init: str,
                        backend: str) -> nn.Module:
    factory = {} if ln.weight is None else {"device": ln.weight.device, "dtype": ln.weight.dtype}
    ts = modules.TSLayerNorm(ln.normalized_shape, num_tasks, eps=ln.eps, gate=gate, bias=bias, backend=backend,
                             **factory)
    with torch.no_grad():
        if ln.weight is not None:
            if gate == "none":
                ts.weight.copy_(ln.weight.expand_as(ts.weight))
            elif gate_init == "copy":
                ts.weight.copy_(torch.logit(ln.weight.clamp(1e-3, 1 - 1e-3)).expand_as(ts.weight))
            ts.weight.requires_grad_(ln.weight.requires_grad)
            _warn_if_frozen_random_gates("convert_layernorm", ln.weight, gate, gate_init)
        elif gate == "sigmoid" and gate_init == "copy":
            # elementwise_affine=False: γ is 1 (gate="none" keeps the ones of reset_parameters)
            ts.weight.copy_(torch.logit(torch.ones_like(ts.weight).clamp(1e-3, 1 - 1e-3)))
        if ts.bias is not None and ln.bias is not None:
            ts.bias.copy_(ln.bias.expand_as(ts.bias))
            ts.bias.requires_grad_(ln.bias.requires_grad)
    ts.train(ln.training)
    return ts


def gate_param_groups(model: nn.Module, lr: float, gate_lr_mult: float = 10.0, weight_decay: float = 0.0
                      ) -> list[dict]:
    """Optimizer parameter groups: the sigmoid gates at ``lr · gate_lr_mult`` without weight decay, as the σBN
    reference code trains them; every other trainable parameter at ``lr`` with ``weight_decay``.

    Empty groups are left out, so the result can go straight to any torch.optim optimizer."""
    gate_ids: set[int] = set()
    gates = []
    for m in model.modules():
        if isinstance(m, (modules._TSBatchNorm, modules.TSLayerNorm)) and m.gate == "sigmoid" \
                and m.weight is not None and m.weight.requires_grad and id(m.weight) not in gate_ids:
            gate_ids.add(id(m.weight))
            gates.append(m.weight)
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
    groups = []
    if others:
        groups.append({"params": others, "lr": lr, "weight_decay": weight_decay, "name": "shared"})
    if gates:
        groups.append({"params": gates, "lr": lr * gate_lr_mult, "weight_decay": 0.0, "name": "gates"})
    return groups
