"""Every bad input raises a ValueError or TypeError naming the problem, on every backend available here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tsbn_kernels as tk
from conftest import make_input, make_params

BACKENDS = tk.available_backends("cpu")


def good_call(**overrides):
    g = torch.Generator().manual_seed(0)
    x = make_input((6, 4, 3, 3), generator=g)
    weight, bias, rm, rv = make_params(3, 4, generator=g)
    kwargs = dict(x=x, weight=weight, bias=bias, running_mean=rm, running_var=rv)
    kwargs.update(overrides)
    x = kwargs.pop("x")
    return x, kwargs


CASES = [
    ("wrong rank", dict(x=torch.randn(6)), ValueError, "2D to 5D"),
    ("6-D input", dict(x=torch.randn(6, 4, 1, 1, 1, 1)), ValueError, "2D to 5D"),
    ("integer input", dict(x=torch.ones(6, 4, 3, 3, dtype=torch.int64)), TypeError, "float16, bfloat16"),
    ("not a tensor", dict(x=[[1.0]]), TypeError, "torch.Tensor"),
    ("channel mismatch", dict(weight=torch.randn(3, 5)), ValueError, "weight must have shape (3, 4)"),
    ("1-D weight", dict(weight=torch.randn(4)), ValueError, "weight must have shape [num_tasks, num_channels]"),
    ("bias shape", dict(bias=torch.randn(3, 3)), ValueError, "bias must have shape (3, 4)"),
    ("running_mean shape", dict(running_mean=torch.randn(2, 4)), ValueError,
     "running_mean has leading (task) dimension 2"),
    ("running_var shape", dict(running_var=torch.ones(3, 5)), ValueError, "running_var must have shape"),
    ("only running_mean", dict(running_var=None), ValueError, "both running_mean and running_var"),
    ("batch not divisible", dict(x=torch.randn(7, 4, 3, 3)), ValueError, "not divisible by num_tasks=3"),
    ("task_ids float", dict(task_ids=torch.zeros(6)), TypeError, "integer dtype"),
    ("task_ids shape", dict(task_ids=torch.zeros(5, dtype=torch.long)), ValueError, "shape (6,)"),
    ("task_ids 2-D", dict(task_ids=torch.zeros(6, 1, dtype=torch.long)), ValueError, "shape (6,)"),
    ("task_ids too large", dict(task_ids=torch.tensor([0, 1, 2, 3, 0, 1])), ValueError, "[0, 3)"),
    ("task_ids negative", dict(task_ids=torch.tensor([0, 1, 2, -1, 0, 1])), ValueError, "[0, 3)"),
    ("task_ids list", dict(task_ids=[0, 1, 2, 0, 1, 2]), TypeError, "task_ids must be a torch.Tensor"),
    ("weight int", dict(weight=torch.ones(3, 4, dtype=torch.int32)), TypeError, "floating-point"),
    ("mixed dtypes", dict(weight=torch.randn(3, 4, dtype=torch.float64)), TypeError, "weight has dtype"),
    ("mixed devices", dict(bias=torch.randn(3, 4, device="meta")), ValueError, "bias is on meta"),
    ("one value per channel", dict(x=torch.randn(3, 4)), ValueError, "more than 1 value per channel"),
    ("one sample of a task", dict(x=torch.randn(4, 4), task_ids=torch.tensor([0, 0, 1, 2])), ValueError,
     "1 sample(s) of task 1"),
    ("bad gate", dict(gate="tanh"), ValueError, "gate must be one of"),
    ("bad activation", dict(activation="gelu"), ValueError, "activation must be one of"),
    ("bad eps", dict(eps=0.0), ValueError, "eps must be a positive"),
    ("bad momentum", dict(momentum=1.5), ValueError, "momentum must be a float in [0, 1]"),
    ("eval without stats", dict(training=False, running_mean=None, running_var=None), ValueError,
     "training=False needs running_mean"),
    ("momentum None without counter", dict(momentum=None), ValueError, "num_batches_tracked"),
    ("no per-task tensor", dict(weight=None, bias=None, running_mean=None, running_var=None), ValueError,
     "cannot tell the number of tasks"),
    ("num_tasks disagrees", dict(num_tasks=2), ValueError, "but num_tasks says num_tasks=2"),
    ("unknown backend", dict(backend="tpu"), ValueError, "available there"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,overrides,error,message", CASES, ids=[c[0] for c in CASES])
def test_bad_batch_norm_input(name, overrides, error, message, backend):
    overrides = dict(overrides)
    overrides.setdefault("backend", backend)
    x, kwargs = good_call(**overrides)
    weight = kwargs.pop("weight")
    with pytest.raises(error, match=_escape(message)):
        tk.ts_batch_norm(x, weight, **kwargs)


def test_good_call_passes_on_every_backend():
    for backend in BACKENDS:
        x, kwargs = good_call(backend=backend)
        weight = kwargs.pop("weight")
        assert tk.ts_batch_norm(x, weight, **kwargs).shape == x.shape


def test_numpy_scalars_are_numbers_too():
    x, kwargs = good_call(eps=np.float32(1e-3), momentum=np.float64(0.3))
    weight = kwargs.pop("weight")
    want_x, want = good_call(eps=1e-3, momentum=0.3)
    want.pop("weight")
    torch.testing.assert_close(tk.ts_batch_norm(x, weight, **kwargs), tk.ts_batch_norm(want_x, weight, **want))
    torch.testing.assert_close(kwargs["running_var"], want["running_var"])


def test_unavailable_backend_lists_available_ones():
    x, kwargs = good_call(backend="cuda" if "cuda" not in BACKENDS else "nope")
    with pytest.raises(ValueError, match="available there: \\['eager'"):
        tk.ts_batch_norm(x, kwargs.pop("weight"), **kwargs)


def test_env_override_naming_no_backend(monkeypatch):
    monkeypatch.setenv("TSBN_BACKEND", "fastest")
    x, kwargs = good_call()
    with pytest.raises(ValueError, match="TSBN_BACKEND='fastest' names no backend"):
        tk.ts_batch_norm(x, kwargs.pop("weight"), **kwargs)


def test_env_override_picks_backend(monkeypatch):
    monkeypatch.setenv("TSBN_BACKEND", "eager")
    x, kwargs = good_call()
    y = tk.ts_batch_norm(x, kwargs.pop("weight"), **kwargs)
    assert y.shape == x.shape


LN_CASES = [
    ("trailing mismatch", dict(weight=torch.randn(3, 7)), ValueError, "do not match the trailing"),
    ("no params", dict(weight=None, bias=None), ValueError, "needs weight or bias"),
    ("bias shape", dict(bias=torch.randn(3, 9)), ValueError, "bias must have shape (3, 8)"),
    ("batch not divisible", dict(x=torch.randn(5, 4, 8)), ValueError, "not divisible"),
    ("task_ids range", dict(task_ids=torch.tensor([0, 1, 2, 3, 0, 1])), ValueError, "[0, 3)"),
    ("1-D input", dict(x=torch.randn(8)), ValueError, "2D to 8D"),
    ("bad gate", dict(gate="relu"), ValueError, "gate must be one of"),
]


@pytest.mark.parametrize("name,overrides,error,message", LN_CASES, ids=[c[0] for c in LN_CASES])
def test_bad_layer_norm_input(name, overrides, error, message):
    kwargs = dict(x=torch.randn(6, 4, 8), weight=torch.randn(3, 8), bias=torch.randn(3, 8))
    kwargs.update(overrides)
    x, weight = kwargs.pop("x"), kwargs.pop("weight")
    for backend in tk.available_backends("cpu", "ts_layer_norm"):
        with pytest.raises(error, match=_escape(message)):
            tk.ts_layer_norm(x, weight, backend=backend, **kwargs)


def test_module_errors():
    with pytest.raises(ValueError, match="num_tasks must be a positive int"):
        tk.TSBatchNorm2d(4, 0)
    with pytest.raises(ValueError, match="gate must be one of"):
        tk.TSBatchNorm2d(4, 2, gate="softmax")
    bn = tk.TSBatchNorm2d(4, 2)
    with pytest.raises(ValueError, match="expected 4D input, got 3D"):
        bn(torch.randn(4, 4, 5))
    with pytest.raises(ValueError, match="expected 4 channels"):
        bn(torch.randn(4, 3, 5, 5))
    with pytest.raises(ValueError, match="expected 2D to 3D input"):
        tk.TSBatchNorm1d(4, 2)(torch.randn(4, 4, 5, 5))


def _escape(text: str) -> str:
    import re

    return re.escape(text)
