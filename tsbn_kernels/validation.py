"""Input checks shared by every backend.

Every public op validates here before dispatching, so a bad call raises the same ValueError or TypeError,
naming the problem, whichever backend would have run it: never a segfault, a device-side assert or a
silently wrong result. Checks that need the values of ``task_ids`` (range, per-task counts) cost one
host synchronisation per ids tensor: the result is kept for the last tensor checked (while it is not modified
in place), so the layers of one forward under ``tk.task_ids(ids)`` sync once, not once per layer. The
replicated-batch layout (``task_ids=None``) needs none. Under torch.compile the values cannot be read while
tracing: the same range and count checks become an in-graph assertion (a RuntimeError on the CPU, a device-side
assert on a GPU); on meta tensors, which hold no values, they are skipped.
"""
from __future__ import annotations

import math
import numbers
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from .reference import samples_per_task

GATES = ("sigmoid", "none")
ACTIVATIONS = (None, "relu")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class TaskLayout:
    """How the batch is split into tasks after validation.

    task_ids: None for task-major blocks, else an int64 tensor on x's device with values in [0, T).
    counts: samples per task as a host tuple for per-sample ids whose values were read; None for task-major
    blocks, and for ids that could not be read (under torch.compile, on meta tensors).
    """

    num_tasks: int
    task_ids: Tensor | None
    counts: tuple[int, ...] | None


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_input_tensor(x: object, min_dim: int, max_dim: int, op: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: input must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if not min_dim <= x.dim() <= max_dim:
        raise ValueError(f"{op}: expected a {min_dim}D to {max_dim}D input, got {x.dim()}D input of shape "
                         f"{tuple(x.shape)}")
    if x.is_complex() or x.is_sparse:
        raise TypeError(f"{op}: sparse and complex inputs are not supported")
    return x


def check_param(name: str, t: object, expected_shape: tuple[int, ...], x: Tensor, op: str) -> None:
    """A per-task parameter or buffer: right type, shape, device, and dtype float32 or x's dtype."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() != len(expected_shape) or tuple(t.shape) != tuple(expected_shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(expected_shape)} ([num_tasks, ...]), got "
                         f"{tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but the input is on {x.device}; all tensors must be "
                         "on one device")
    if t.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but the input has dtype {x.dtype}; parameters and "
                        "statistics must be float32 or the input's dtype")


def infer_num_tasks(op: str, num_tasks: int | None, named: dict[str, object]) -> int:
    """T from the leading dimension of the per-task tensors, which must agree with each other."""
    source = "num_tasks" if num_tasks is not None else None
    for name, t in named.items():
        if isinstance(t, Tensor) and t.dim() >= 1:
            if num_tasks is not None and t.shape[0] != num_tasks:
                raise ValueError(f"{op}: {name} has leading (task) dimension {t.shape[0]}, shape {tuple(t.shape)}, "
                                 f"but {source} says num_tasks={num_tasks}")
            num_tasks, source = t.shape[0], name
    if isinstance(num_tasks, Tensor) and torch.jit.is_tracing():
        num_tasks = int(num_tasks)    # torch.jit.trace hands sizes out as tensors; T is a constant of the model
    if num_tasks is None:
        raise ValueError(f"{op}: cannot tell the number of tasks: pass weight, bias or running statistics of "
                         "shape [num_tasks, ...], or num_tasks=")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"{op}: num_tasks must be a positive int, got {num_tasks!r}")
    return num_tasks


def task_counts(task_ids: Tensor, num_tasks: int) -> Tensor:
    """[T + 2] int64: samples below 0, then per task, then at or above num_tasks, in one pass.

    Uses the compiled op where the extension is built (one kernel on CUDA, no device assert on bad ids).
    """
    from . import _extension

    if _extension.has_op("task_counts"):
        return torch.ops.tsbn.task_counts(task_ids, num_tasks)
    return torch.bincount(task_ids.long().clamp(-1, num_tasks) + 1, minlength=num_tasks + 2)


def check_task_layout(x: Tensor, task_ids: object, num_tasks: int, op: str, *,
                      per_sample_dim: int = 0) -> TaskLayout:
    batch = x.shape[per_sample_dim]
    if task_ids is None:
        if batch % num_tasks != 0:
            raise ValueError(f"{op}: batch size {batch} is not divisible by num_tasks={num_tasks}; the "
                             "replicated batch needs equal task-major blocks, or pass per-sample task_ids")
        return TaskLayout(num_tasks, None, None)
    if not isinstance(task_ids, Tensor):
        raise TypeError(f"{op}: task_ids must be a torch.Tensor of integers or None, got "
                        f"{type(task_ids).__name__}")
    if task_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{op}: task_ids must have an integer dtype (int64 preferred), got {task_ids.dtype}")
    if task_ids.dim() != 1 or task_ids.shape[0] != batch:
        raise ValueError(f"{op}: task_ids must have shape ({batch},), one task per sample, got "
                         f"{tuple(task_ids.shape)}")
    if task_ids.device != x.device:
        raise ValueError(f"{op}: task_ids is on {task_ids.device} but the input is on {x.device}")
    if torch.compiler.is_compiling() or task_ids.device.type == "meta":   # values not readable here
        return TaskLayout(num_tasks, task_ids.long(), None)
    counts = _checked_counts.get(task_ids, num_tasks)
    if counts is None:
        counts = task_counts(task_ids, num_tasks).tolist()  # the one host sync of this path
        if counts[0] or counts[-1]:
            lo, hi = torch.aminmax(task_ids)
            raise ValueError(f"{op}: task_ids must lie in [0, {num_tasks}), got values in [{int(lo)}, {int(hi)}]")
        counts = tuple(counts[1:-1])
        _checked_counts.put(task_ids, num_tasks, counts)
    return TaskLayout(num_tasks, task_ids.long(), counts)


def assert_task_layout_in_graph(layout: TaskLayout, spatial: int, training: bool, op: str) -> None:
    """The range (and, in training, more-than-one-value) checks of ids that could not be read on the host, as an
    assertion inside the traced graph."""
    ids = layout.task_ids
    if ids is None or layout.counts is not None or ids.device.type == "meta":
        return
    T = layout.num_tasks
    in_range = ((ids >= 0) & (ids < T)).all()
    torch._assert_async(in_range, f"{op}: task_ids must lie in [0, {T})")
    if training:
        counts = samples_per_task(ids.clamp(0, T - 1), T)
        torch._assert_async((counts * spatial != 1).all(), f"{op}: expected more than 1 value per channel when "
                            "training, got a task with a single value per channel")


class _LastCheckedIds:
    """The per-task counts of the last task_ids tensor that passed the range check, while it is unchanged.

    A change is seen through the tensor's version counter, which every in-place op bumps. Writes that bypass it
    (through the array of ``torch.from_numpy`` — a loader refilling one buffer per batch —, ``ids.data``, DLPack)
    would leave stale counts here and let out-of-range ids reach a kernel: for CPU ids, where reading the values
    costs no device sync, the cache also keeps a copy of the values and is used only while they still match."""

    def __init__(self) -> None:
        self._entry: tuple | None = None

    def get(self, ids: Tensor, num_tasks: int) -> tuple[int, ...] | None:
        entry = self._entry
        if entry is None or ids.is_inference():
            return None
        ref, version, tasks, counts, values = entry
        if ref() is not ids or version != ids._version or tasks != num_tasks:
            return None
        if values is not None and not torch.equal(values, ids):
            return None
        return counts

    def put(self, ids: Tensor, num_tasks: int, counts: tuple[int, ...]) -> None:
        if not ids.is_inference():  # inference tensors track no version, so a change could not be seen
            values = ids.detach().clone() if ids.device.type == "cpu" else None
            self._entry = (weakref.ref(ids), ids._version, num_tasks, counts, values)


_checked_counts = _LastCheckedIds()


def check_scalars(op: str, eps: object, gate: object, momentum: object = 0.1,
                  activation: object = None) -> None:
    if gate not in GATES:
        raise ValueError(f"{op}: gate must be one of {GATES}, got {gate!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"{op}: eps must be a positive float, got {eps!r}")
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, numbers.Real)
                                 or not 0.0 <= momentum <= 1.0):
        raise ValueError(f"{op}: momentum must be a float in [0, 1] or None (cumulative average), got "
                         f"{momentum!r}")


def check_batch_norm(x, weight, bias, running_mean, running_var, task_ids, num_tasks, num_batches_tracked,
                     training, momentum, eps, gate, activation, op: str = "ts_batch_norm",
                     across_processes: bool = False) -> TaskLayout:
    """``across_processes``: the statistics span every process (sync mode), so one value of a task here is no
    error — the other processes may hold more of it."""
    check_input_tensor(x, 2, 5, op)
    check_scalars(op, eps, gate, momentum, activation)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: pass both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError(f"{op}: training=False needs running_mean and running_var (eval mode normalises with "
                         "the running statistics)")
    named = {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var}
    for name, t in named.items():
        if isinstance(t, Tensor) and t.dim() != 2:
            raise ValueError(f"{op}: {name} must have shape [num_tasks, num_channels] (2-D), got shape "
                             f"{tuple(t.shape)}")
    num_tasks = infer_num_tasks(op, num_tasks, named)
    shape = (num_tasks, x.shape[1])
    for name, t in named.items():
        check_param(name, t, shape, x, op)
    if num_batches_tracked is not None:
        if not isinstance(num_batches_tracked, Tensor) or num_batches_tracked.shape != (num_tasks,) \
                or num_batches_tracked.dtype != torch.int64 or num_batches_tracked.device != x.device:
            raise ValueError(f"{op}: num_batches_tracked must be an int64 tensor of shape ({num_tasks},) on "
                             f"{x.device}")
    if training and momentum is None and running_mean is not None and num_batches_tracked is None:
        raise ValueError(f"{op}: momentum=None (cumulative moving average) needs num_batches_tracked")
    layout = check_task_layout(x, task_ids, num_tasks, op)
    spatial = math.prod(x.shape[2:])
    single_value_check = training and not across_processes
    if single_value_check and (layout.counts is not None or layout.task_ids is None):
        per_task = layout.counts if layout.counts is not None else (x.shape[0] // num_tasks,) * num_tasks
        for t, n in enumerate(per_task):
            if n * spatial == 1:
                raise ValueError(f"{op}: expected more than 1 value per channel when training, got input size "
                                 f"{tuple(x.shape)} with {n} sample(s) of task {t}")
    assert_task_layout_in_graph(layout, spatial, single_value_check, op)
    return layout


def check_layer_norm(x, weight, bias, task_ids, num_tasks, eps, gate, op: str = "ts_layer_norm") -> TaskLayout:
    check_input_tensor(x, 2, 8, op)
    check_scalars(op, eps, gate)
    params = weight if weight is not None else bias
    if params is None:
        raise ValueError(f"{op}: needs weight or bias of shape [num_tasks, *normalized_shape]; without either "
                         "it is a plain F.layer_norm")
    num_tasks = infer_num_tasks(op, num_tasks, {"weight": weight, "bias": bias})
    if not isinstance(params, Tensor):
        raise TypeError(f"{op}: weight and bias must be torch.Tensors or None")
    normalized_shape = tuple(params.shape[1:])
    if len(normalized_shape) == 0 or len(normalized_shape) >= x.dim() or \
            tuple(x.shape[x.dim() - len(normalized_shape):]) != normalized_shape:
        raise ValueError(f"{op}: weight/bias of shape {tuple(params.shape)} ([num_tasks, "
                         f"*normalized_shape]) do not match the trailing dimensions of the input "
                         f"{tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        check_param(name, t, (num_tasks,) + normalized_shape, x, op)
    layout = check_task_layout(x, task_ids, num_tasks, op)
    assert_task_layout_in_graph(layout, 0, False, op)
    return layout
