"""The eager reference against the σBN authors' formula: per task, F.batch_norm with the sigmoid gate."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from conftest import make_input, make_params, ragged_task_ids, tolerance
from tsbn_kernels import reference


def per_task_oracle(x, weight, bias, running_mean, running_var, task_ids, num_tasks, *, training, momentum,
                    eps, gate, activation, oracle_dtype=torch.float64):
    """Literal per-task F.batch_norm (the σBN authors' formula), in ``oracle_dtype``."""
    if task_ids is None:
        task_ids = torch.arange(x.shape[0]) // (x.shape[0] // num_tasks)
    y = torch.empty(x.shape, dtype=oracle_dtype)
    for t in range(num_tasks):
        rows = (task_ids == t).nonzero().flatten()
        if rows.numel() == 0:
            continue
        w = None if weight is None else weight[t].to(torch.promote_types(weight.dtype, torch.float32))
        a = None if w is None else (w.sigmoid() if gate == "sigmoid" else w)
        rm = None if running_mean is None else running_mean[t]
        rv = None if running_var is None else running_var[t]
        m = momentum[t].item() if isinstance(momentum, torch.Tensor) else momentum
        stats = (None, None) if rm is None else (rm.to(oracle_dtype), rv.to(oracle_dtype))
        yt = F.batch_norm(x[rows].to(oracle_dtype), *stats,
                          None if a is None else a.to(oracle_dtype),
                          None if bias is None else bias[t].to(oracle_dtype), training, m, eps)
        if rm is not None:
            rm.copy_(stats[0])
            rv.copy_(stats[1])
        y[rows] = F.relu(yt) if activation == "relu" else yt
    return y


def run_both(x, weight, bias, stats, task_ids, num_tasks, **kw):
    rm, rv = stats
    rm_ref, rv_ref = (None, None) if rm is None else (rm.clone(), rv.clone())
    rm_or, rv_or = (None, None) if rm is None else (rm.clone().double(), rv.clone().double())
    y = reference.ts_batch_norm(x, weight, bias, rm_ref, rv_ref, task_ids=task_ids, num_tasks=num_tasks, **kw)
    y_or = per_task_oracle(x, weight, bias, rm_or, rv_or, task_ids, num_tasks, **kw)
    return (y, rm_ref, rv_ref), (y_or, rm_or, rv_or)


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 7), (6, 4, 5, 3), (6, 2, 3, 4, 5)])
@pytest.mark.parametrize("gate", ["sigmoid", "none"])
@pytest.mark.parametrize("training", [True, False])
def test_matches_per_task_batch_norm(shape, gate, training, gen):
    x = make_input(shape, torch.float64, generator=gen)
    weight, bias, rm, rv = make_params(3, shape[1], torch.float64, generator=gen)
    got, want = run_both(x, weight, bias, (rm, rv), None, 3, training=training, momentum=0.1, eps=1e-5,
                         gate=gate, activation=None)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.to(g.dtype), **tolerance(torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision_accumulates_in_fp32_and_keeps_layout(dtype, channels_last, gen):
    x = make_input((8, 5, 6, 7), dtype, channels_last=channels_last, offset=3.0, generator=gen)
    weight, bias, rm, rv = make_params(4, 5, torch.float32, generator=gen)
    got, want = run_both(x, weight, bias, (rm, rv), None, 4, training=True, momentum=0.1, eps=1e-5,
                         gate="sigmoid", activation="relu")
    assert got[0].dtype == dtype
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=layout)
    torch.testing.assert_close(got[0].double(), want[0], **tolerance(dtype))
    # Statistics come from the fp32 accumulation of the rounded input: fp32-level agreement.
    torch.testing.assert_close(got[1].double(), want[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[2].double(), want[2], rtol=1e-4, atol=1e-4)


def test_large_mean_small_std_stays_exact(gen):
    # |mean| = 1e4 · std: a one-pass E[x²] − E[x]² in fp32 would lose every digit of the variance.
    x = make_input((6, 4, 9, 9), torch.float32, offset=1e4, scale=1.0, generator=gen)
    weight, bias, rm, rv = make_params(3, 4, generator=gen)
    got, want = run_both(x, weight, bias, (rm, rv), None, 3, training=True, momentum=0.1, eps=1e-5,
                         gate="sigmoid", activation=None)
    torch.testing.assert_close(got[0].double(), want[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got[2].double(), want[2], rtol=1e-3, atol=1e-3)


def test_ragged_and_empty_tasks_leave_absent_tasks_untouched(gen):
    x = make_input((7, 3, 4, 4), torch.float64, generator=gen)
    task_ids = torch.tensor([2, 0, 2, 2, 0, 4, 2])  # tasks 1 and 3 are absent
    weight, bias, rm, rv = make_params(5, 3, torch.float64, generator=gen)
    rm0, rv0 = rm.clone(), rv.clone()
    weight.requires_grad_(True)
    got, want = run_both(x, weight, bias, (rm, rv), task_ids, 5, training=True, momentum=0.3, eps=1e-5,
                         gate="sigmoid", activation=None)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.to(g.dtype), **tolerance(torch.float64))
    for t in (1, 3):
        assert torch.equal(got[1][t], rm0[t]) and torch.equal(got[2][t], rv0[t])
    got[0].square().sum().backward()
    assert torch.all(weight.grad[[1, 3]] == 0) and torch.all(weight.grad[[0, 2, 4]] != 0)


def test_cumulative_average_per_task_factor(gen):
    x = make_input((6, 3, 5), torch.float64, generator=gen)
    weight, bias, rm, rv = make_params(3, 3, torch.float64, generator=gen)
    factor = torch.tensor([1.0, 0.5, 0.25])
    got, want = run_both(x, weight, None, (rm, rv), None, 3, training=True, momentum=factor, eps=1e-3,
                         gate="none", activation=None)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.to(g.dtype), **tolerance(torch.float64))


def test_gradients_match_per_task_batch_norm(gen):
    x = make_input((6, 3, 4, 5), torch.float64, offset=2.0, generator=gen).requires_grad_(True)
    weight, bias, _, _ = make_params(3, 3, torch.float64, generator=gen)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    dy = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    y = reference.ts_batch_norm(x, weight, bias, training=True, gate="sigmoid", activation="relu")
    grads = torch.autograd.grad(y, (x, weight, bias), dy)
    y_or = per_task_oracle(x, weight, bias, None, None, None, 3, training=True, momentum=0.1, eps=1e-5,
                           gate="sigmoid", activation="relu")
    grads_or = torch.autograd.grad(y_or, (x, weight, bias), dy)
    for g, w in zip(grads, grads_or):
        torch.testing.assert_close(g, w, **tolerance(torch.float64))


def test_gradcheck_float64(gen):
    x = make_input((4, 2, 3), torch.float64, generator=gen).requires_grad_(True)
    weight, bias, _, _ = make_params(2, 2, torch.float64, generator=gen)
    ids = torch.tensor([1, 0, 1, 1])
    fn = lambda x, w, b: reference.ts_batch_norm(x, w, b, task_ids=ids, num_tasks=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight.requires_grad_(True), bias.requires_grad_(True)))


@given(
    num_tasks=st.integers(1, 4),
    per_task=st.lists(st.integers(0, 3), min_size=1, max_size=4),
    channels=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    gate=st.sampled_from(["sigmoid", "none"]),
    use_bias=st.booleans(),
    activation=st.sampled_from([None, "relu"]),
    offset=st.sampled_from([0.0, 50.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_ragged_task_ids(num_tasks, per_task, channels, spatial, gate, use_bias, activation, offset,
                                  seed):
    g = torch.Generator().manual_seed(seed)
    _, task_ids = ragged_task_ids((per_task + [0] * num_tasks)[:num_tasks], spatial, g)
    x = make_input((task_ids.numel(), channels, *spatial), torch.float64, offset=offset, generator=g)
    weight, bias, rm, rv = make_params(num_tasks, channels, torch.float64, bias=use_bias, generator=g)
    got, want = run_both(x, weight, bias, (rm, rv), task_ids, num_tasks, training=True, momentum=0.2,
                         eps=1e-5, gate=gate, activation=activation)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("gate", ["sigmoid", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_layer_norm_matches_per_task_layer_norm(gate, dtype, gen):
    x = make_input((6, 5, 8), dtype, offset=4.0, generator=gen)
    weight, bias, _, _ = make_params(3, 8, torch.float32, stats=False, generator=gen)
    task_ids = torch.tensor([2, 2, 0, 1, 0, 2])
    y = reference.ts_layer_norm(x, weight, bias, task_ids=task_ids, eps=1e-5, gate=gate)
    assert y.dtype == dtype
    for b in range(6):
        t = task_ids[b]
        a = weight[t].double().sigmoid() if gate == "sigmoid" else weight[t].double()
        want = F.layer_norm(x[b].double(), (8,), a, bias[t].double(), 1e-5)
        torch.testing.assert_close(y[b].double(), want, **tolerance(dtype))


def test_layer_norm_multi_dim_normalized_shape_task_major(gen):
    x = make_input((4, 3, 2, 5), torch.float64, generator=gen)
    weight = torch.randn(2, 2, 5, dtype=torch.float64, generator=gen)
    y = reference.ts_layer_norm(x, weight, None, gate="sigmoid")
    for b in range(4):
        want = F.layer_norm(x[b], (2, 5), weight[b // 2].sigmoid(), None, 1e-5)
        torch.testing.assert_close(y[b], want)
