"""Backend registry: which implementation runs an op on a given device.

A backend is a name ("eager", "cpu", "cuda", "triton") with, per op, a function taking the *validated*
arguments of that op (see ``tsbn_kernels.functional``). Kernel modules register themselves when
imported; they are imported lazily, on the first dispatch, so ``import tsbn_kernels`` stays cheap and a
missing optional dependency (triton, the compiled extension) only removes that backend.

Contract of a ``ts_batch_norm`` implementation (kwargs as in ``reference.ts_batch_norm``):
    impl(x, weight, bias, running_mean, running_var, *, task_ids, num_tasks, training, momentum, eps,
         gate, activation) -> y
  - task_ids is None (task-major blocks) or a validated int64 tensor; momentum is a float or a float32
    tensor [T] (float64) of per-task factors; running statistics are updated in place for the tasks present.
  - y has x's dtype, shape and memory format; gradients flow to x, weight and bias.
Contract of a ``ts_layer_norm`` implementation:
    impl(x, weight, bias, *, task_ids, num_tasks, eps, gate) -> y
Contract of a ``ts_batch_norm_sync`` implementation (training with statistics over every process;
``sync_batch_norm.sync_ts_batch_norm`` is the eager one, fused backends register ``SyncKernels``):
    impl(x, weight, bias, running_mean, running_var, *, task_ids, num_tasks, momentum, eps, gate, activation,
         num_batches_tracked, process_group) -> y
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import reference
from .sync_batch_norm import sync_ts_batch_norm

OPS = ("ts_batch_norm", "ts_layer_norm", "ts_batch_norm_sync")

# Modules that register fused backends on import. A module that fails to import leaves its backend out
# and its error in ``unavailable_reasons()``.
_KERNEL_MODULES: tuple[str, ...] = (
    "tsbn_kernels.kernels.cpp_ts_batch_norm",
    "tsbn_kernels.kernels.aten_ts_layer_norm",
    "tsbn_kernels.kernels.triton_ts_batch_norm",
    "tsbn_kernels.kernels.triton_ts_layer_norm",
)

# "auto" tries these in order; the first that is available for the device and op wins.
AUTO_ORDER = {"cpu": ("cpu", "eager"), "cuda": ("cuda", "triton", "eager")}


@dataclass
class Backend:
    name: str
    device_types: frozenset[str]
    ops: dict[str, Callable] = field(default_factory=dict)


_registry: dict[str, Backend] = {}
_import_errors: dict[str, str] = {}
_loaded = False


def register(name: str, op: str, impl: Callable, device_types: tuple[str, ...]) -> None:
    """Make ``impl`` the ``op`` of backend ``name`` on the given device types ("cpu", "cuda")."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    backend = _registry.setdefault(name, Backend(name, frozenset(device_types)))
    backend.device_types = backend.device_types | frozenset(device_types)
    backend.ops[op] = impl


def _load_kernel_modules() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _KERNEL_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            _import_errors[module] = f"{type(exc).__name__}: {exc}"


def unavailable_reasons() -> dict[str, str]:
    _load_kernel_modules()
    return dict(_import_errors)


def _device_type(device: torch.device | str | None) -> str:
    if device is None:
        return "cpu"
    return torch.device(device).type


def _runs_on(backend: Backend, device_type: str) -> bool:
    if device_type in backend.device_types:
        return True
    # Triton kernels run on CPU tensors under the interpreter; used by the test suite.
    return backend.name == "triton" and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(device: torch.device | str | None = None, op: str = "ts_batch_norm") -> list[str]:
    """Backends that can run ``op`` on ``device`` (default: the CPU), eager first."""
    _load_kernel_modules()
    device_type = _device_type(device)
    names = [b.name for b in _registry.values() if op in b.ops and _runs_on(b, device_type)]
    return sorted(names, key=lambda n: (n != "eager", n))


def resolve(backend: str, device: torch.device, op: str, x: torch.Tensor | None = None,
            training: bool = True) -> tuple[str, Callable]:
    """The (name, implementation) that runs ``op`` on ``device`` for the requested backend. For "auto" with
    more than one fused backend available, the measured-fastest for x's shape (``tsbn_kernels.tuning``) wins
    when a tuning table covers it; otherwise the first of ``AUTO_ORDER``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    # The fused ops are custom ops with autograd formulas but no functorch or jvp rules (a fused op would drop the
    # tangents of dual tensors and return a plain output, silently); the reference is plain PyTorch, which every
    # transform supports.
    transform = ("inside a torch.func transform (vmap, grad, jacrev, ...)", "functorch") if _under_torch_func() \
        else ("under forward-mode AD (torch.autograd.forward_ad.dual_level)", "jvp") if _under_forward_ad() else None
    if transform is not None:
        if backend not in ("auto", "eager"):
            raise ValueError(f"backend {backend!r} cannot run {op} {transform[0]}: its kernels have no "
                             f"{transform[1]} rules. Use backend='auto', which runs the eager reference there, or "
                             "backend='eager'")
        return "eager", _registry["eager"].ops[op]
    if _in_onnx_export():
        # ONNX has no counterpart of the fused ops; the reference is plain PyTorch (in eval: a few elementwise ops),
        # which both exporters translate. Whatever the backend, the exported model computes the same function.
        return "eager", _registry["eager"].ops[op]
    shape_key = None
    if x is not None and backend == "auto":
        from . import tuning

        shape_key = tuning.shape_key(op, x, training)
    name = _choose(backend, torch.device(device).type, op, shape_key)
    return name, _registry[name].ops[op]


def _in_onnx_export() -> bool:
    # The TorchScript exporter traces with torch.jit, the dynamo one through torch.export: asked only then, since
    # torch.onnx.is_in_onnx_export costs microseconds (imports inside) on every eager call.
    if torch._C._get_tracing_state() is None and not torch.compiler.is_exporting():
        return False
    return torch.onnx.is_in_onnx_export()


def _under_forward_ad() -> bool:
    # Dual tensors exist only inside a dual_level() block, which sets this level (-1 outside).
    return not torch.compiler.is_compiling() and torch.autograd.forward_ad._current_level >= 0


def _under_torch_func() -> bool:
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def assume_constant_result(fn: Callable) -> Callable:
    """torch.compiler.assume_constant_result without importing torch._dynamo (0.8 s) into every
    ``import tsbn_kernels``: the public decorator imports it only to set one attribute on fn. Where dynamo is
    loaded already the public API marks fn, else _mark_constant does (tests/test_tuning.py checks that both mark
    a function alike, and compiles a module with fullgraph=True in a process that imported us first)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    return _mark_constant(fn)


def _mark_constant(fn: Callable) -> Callable:
    fn._dynamo_marked_constant = True
    return fn


# The choice is plain Python over constants (names, the environment, the registry, a tuning table read from
# disk), so torch.compile evaluates it once while tracing instead of tracing the lazy kernel-module imports
# and file reads inside it: a module compiled with fullgraph=True before any eager call would break there.
@assume_constant_result
def _choose(backend: str, device_type: str, op: str, shape_key: tuple | None) -> str:
    available = available_backends(device_type, op)
    if backend == "auto":
        override = os.environ.get("TSBN_BACKEND", "auto") or "auto"
        if override != "auto" and override not in _registry and override not in AUTO_ORDER.get(device_type, ()):
            raise ValueError(f"TSBN_BACKEND={override!r} names no backend; known: {sorted(_registry)}")
        # The override picks the backend wherever it can run the op; elsewhere "auto" applies.
        order = (override,) if override in available else AUTO_ORDER.get(device_type, ("eager",))
        backend = next((name for name in order if name in available), "eager")
        fused = [name for name in order if name in available and name != "eager"]
        if len(fused) > 1 and shape_key is not None:
            from . import tuning

            backend = tuning.choose_backend(device_type, shape_key, fused) or backend
    if backend not in available:
        hint = "".join(f"\n  {m}: {err}" for m, err in _import_errors.items())
        raise ValueError(f"backend {backend!r} cannot run {op} on {device_type}; available there: {available}"
                         + (f"\nkernel modules that failed to import:{hint}" if hint else ""))
    return backend


register("eager", "ts_batch_norm", reference.ts_batch_norm, ("cpu", "cuda", "xpu", "mps", "meta"))
register("eager", "ts_layer_norm", reference.ts_layer_norm, ("cpu", "cuda", "xpu", "mps", "meta"))
register("eager", "ts_batch_norm_sync", sync_ts_batch_norm, ("cpu", "cuda", "xpu", "mps", "meta"))
