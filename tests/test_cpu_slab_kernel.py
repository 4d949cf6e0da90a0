"""The C++ CPU kernel's two planar (NCHW) paths: "slab" (one (task, channel) unit at a time, end to end while it is
in cache: 2 passes forward, 3 backward) and "split" (a statistics pass over all of x, then an apply pass).

Both must give the same bits: forward y and running statistics, backward dx, dweight and dbias, for every thread
count, task layout, gate, dtype and shape; and both must match the float64 reference. TSBN_CPU_SLAB_BYTES forces
a path (0: split; a large budget: slab), and ``torch.ops.tsbn.ts_bn_cpu_path`` reports which one a call takes,
so that no comparison here is vacuous.
"""
from __future__ import annotations

import contextlib
import math
import os
import zlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tsbn_kernels as tk
from conftest import env_var, make_input, make_params, ragged_task_ids
from test_fused_batch_norm import assert_matches, run

pytestmark = pytest.mark.skipif("cpu" not in tk.available_backends("cpu"), reason="the C++ CPU kernel is not built")

ENV = "TSBN_CPU_SLAB_BYTES"
HUGE = 1 << 40
LARGE_MEAN_TOL = {"y": 1e-3, "dx": 1e-3, "dweight": 5e-3, "dbias": 1e-3, "running_mean": 1e-3,
                  "running_var": 1e-3}  # as in test_fused_batch_norm.test_large_mean_small_std


@contextlib.contextmanager
def cpu_path(budget: int | None, threads: int | None = None):
    """TSBN_CPU_SLAB_BYTES=budget (None: unset) and the intra-op thread count, restored afterwards."""
    old_threads = torch.get_num_threads()
    with env_var(ENV, None if budget is None else str(budget)):
        try:
            if threads is not None:
                torch.set_num_threads(threads)
            yield
        finally:
            torch.set_num_threads(old_threads)


def param_dtype(dtype):
    """float64 parameters for float64 inputs (their gradients are compared at float64 tolerance), else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def path_of(x, task_ids, num_tasks, backward):
    return torch.ops.tsbn.ts_bn_cpu_path(x, task_ids, num_tasks, backward)


def run_path(budget, threads, x, weight, bias, stats, *, task_ids=None, expect, **kw):
    """run() of test_fused_batch_norm under one path, after checking that forward and backward take it."""
    num_tasks = next(t.shape[0] for t in (weight, bias, stats[0]) if t is not None)
    with cpu_path(budget, threads):
        if kw.get("training", True):
            assert path_of(x, task_ids, num_tasks, False).startswith(expect)
        assert path_of(x, task_ids, num_tasks, True).startswith(expect)
        return run("cpu", x, weight, bias, stats, task_ids=task_ids, **kw)


def forward_op(x, weight, bias, stats, task_ids, num_tasks, gate, activation, training=True):
    """The raw forward op's outputs: y, mean, invstd, var, count."""
    return torch.ops.tsbn.ts_bn_forward(x, weight, bias, stats[0], stats[1], task_ids, num_tasks, training, 1e-5,
                                        gate == "sigmoid", activation == "relu")


def assert_bitwise(a, b, names=("y", "dx", "dweight", "dbias", "running_mean", "running_var")):
    for name, p, q in zip(names, a, b):
        if p is None or q is None:
            assert p is None and q is None, name
            continue
        assert p.dtype == q.dtype and p.shape == q.shape, name
        assert torch.equal(p, q), f"{name}: slab and split differ (max {(p.double() - q.double()).abs().max()})"


def both_paths(x, weight, bias, stats, task_ids=None, *, slab_budget=HUGE, **kw):
    """Split (1 and 2 threads) and slab (1 and 2 threads where 2 still fill the threads): all bitwise equal."""
    num_tasks = next(t.shape[0] for t in (weight, bias, stats[0]) if t is not None)
    split = run_path(0, 2, x, weight, bias, stats, task_ids=task_ids, expect="split", **kw)
    assert_bitwise(split, run_path(0, 1, x, weight, bias, stats, task_ids=task_ids, expect="split", **kw))
    slab = run_path(slab_budget, 1, x, weight, bias, stats, task_ids=task_ids, expect="slab", **kw)
    assert_bitwise(split, slab)
    with cpu_path(slab_budget, 2):
        two = path_of(x, task_ids, num_tasks, True).startswith("slab")
    if two:
        assert_bitwise(split, run_path(slab_budget, 2, x, weight, bias, stats, task_ids=task_ids, expect="slab",
                                       **kw))
    if kw.get("training", True):
        gate, act = kw.get("gate", "sigmoid"), kw.get("activation")
        with cpu_path(0, 2):
            raw_split = forward_op(x, weight, bias, stats, task_ids, num_tasks, gate, act)
        with cpu_path(slab_budget, 1):
            raw_slab = forward_op(x, weight, bias, stats, task_ids, num_tasks, gate, act)
        assert_bitwise(raw_split, raw_slab, ("y", "mean", "invstd", "var", "count"))
    return split, slab


RAGGED = torch.tensor([3, 0, 3, 3, 0, 4, 3, 0, 4, 0, 3])  # tasks 1 and 2 absent, 0/3/4 ragged
SHAPES_1D_2D_3D = [(11, 6, 13), (11, 5, 7, 9), (11, 4, 3, 5, 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES_1D_2D_3D, ids=str)
@pytest.mark.parametrize("ragged", [False, True], ids=["task_major", "ragged"])
def test_slab_equals_split_and_reference(dtype, shape, ragged):
    g = torch.Generator().manual_seed(zlib.crc32(repr((dtype, shape, ragged)).encode()))
    if ragged:
        task_ids, num_tasks = RAGGED, 5
        shape = (RAGGED.numel(), *shape[1:])
    else:
        task_ids, num_tasks = None, 3
        shape = (12, *shape[1:])
    x = make_input(shape, dtype, offset=3.0, generator=g)
    weight, bias, rm, rv = make_params(num_tasks, shape[1], param_dtype(dtype), generator=g)
    for gate, activation, b in (("sigmoid", None, None), ("sigmoid", "relu", bias), ("none", "relu", bias),
                                ("none", None, None)):
        kw = dict(gate=gate, activation=activation)
        split, slab = both_paths(x, weight, b, (rm, rv), task_ids, **kw)
        want = run("reference64", x, weight, b, (rm, rv), task_ids=task_ids, **kw)
        assert_matches(slab, want, dtype, x)
        if ragged:
            assert torch.all(slab[2][[1, 2]] == 0)
            assert torch.equal(slab[4][[1, 2]], rm[[1, 2]]) and torch.equal(slab[5][[1, 2]], rv[[1, 2]])
            if b is not None:
                assert torch.all(slab[3][[1, 2]] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ragged", [False, True], ids=["task_major", "ragged"])
def test_slab_large_mean_small_std(dtype, ragged):
    """|mean| = 1e4·std: the shifted per-plane moments and the Chan merge keep the variance on both paths."""
    g = torch.Generator().manual_seed(21)
    task_ids, num_tasks = (RAGGED, 5) if ragged else (None, 3)
    x = make_input((11 if ragged else 6, 4, 9, 11), dtype, offset=1e4, generator=g)
    weight, bias, rm, rv = make_params(num_tasks, 4, param_dtype(dtype), generator=g)
    # With relu, an element whose y is within the fp32 rounding of the 1e4 mean of 0 may flip its mask, and
    # one flipped dy moves s1 of the whole task: relu is compared between the paths only.
    both_paths(x, weight, bias, (rm, rv), task_ids, activation="relu")
    split, slab = both_paths(x, weight, bias, (rm, rv), task_ids)
    if dtype in (torch.float32, torch.float64):
        want = run("reference64", x, weight, bias, (rm, rv), task_ids=task_ids)
        for name, a, b in zip(LARGE_MEAN_TOL, slab, want):
            tol = LARGE_MEAN_TOL[name]
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()),
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("shape", [(6, 7, 1), (6, 2, 5, 1), (9, 13, 1, 1, 17), (6, 31, 3, 37)], ids=str)
def test_slab_odd_shapes(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = make_input(shape, torch.float32, offset=2.0, generator=g)
    c = shape[1]
    weight, bias, rm, rv = make_params(3, c, generator=g)
    # With few channels one thread is needed for enough (task, channel) units; both_paths checks the path.
    split, slab = both_paths(x, weight, bias, (rm, rv), activation="relu")
    assert_matches(slab, run("reference64", x, weight, bias, (rm, rv), activation="relu"), torch.float32, x)


def test_slab_backward_in_eval_mode():
    """Backward with training=False (running statistics, no mean/var terms) on both paths."""
    g = torch.Generator().manual_seed(22)
    x = make_input((9, 6, 5, 7), torch.float32, offset=1.0, generator=g)
    weight, bias, rm, rv = make_params(3, 6, generator=g)
    split, slab = both_paths(x, weight, bias, (rm, rv), training=False, activation="relu")
    assert_matches(slab, run("reference64", x, weight, bias, (rm, rv), training=False, activation="relu"),
                   torch.float32, x)


@pytest.mark.parametrize("units_per_item", [1, 2, 3, 5])
def test_slab_channel_groups(units_per_item):
    """Budgets that hold 1, 2, 3 or 5 units per work item (the last group of 7 channels ragged): same bits."""
    g = torch.Generator().manual_seed(23)
    x = make_input((11, 7, 6, 5), torch.float32, offset=2.0, generator=g)
    weight, bias, rm, rv = make_params(5, 7, generator=g)
    largest = int(torch.bincount(RAGGED).max())
    budget = units_per_item * largest * 30 * 4 * 2          # backward unit: x and dy of the largest task
    with cpu_path(budget, 1):
        # 3 tasks present · 7 channels / 4 items per thread: groups of at most 5 channels keep 4 items.
        assert path_of(x, RAGGED, 5, True) == f"slab:{units_per_item}"
        assert path_of(x, RAGGED, 5, False) == f"slab:{min(5, 2 * units_per_item)}"  # forward: x only
    both_paths(x, weight, bias, (rm, rv), RAGGED, slab_budget=budget, activation="relu")


def test_slab_plan():
    """Which path the default budget picks (the tensors are never read: empty is fine)."""
    with cpu_path(None, 2):
        layer1 = torch.empty(24, 256, 72, 96)                  # nyuv2 layer1: 221 KB units of x
        assert path_of(layer1, None, 3, False).startswith("slab")
        assert path_of(layer1, None, 3, True).startswith("slab")
        assert path_of(layer1.bfloat16(), None, 3, True).startswith("slab")
        city = torch.empty(128, 256, 32, 64)                   # cityscapes layer1: 512 KiB of x per unit
        assert path_of(city, None, 2, False).startswith("slab")
        assert path_of(city, None, 2, True) == "split"         # x and dy: 1 MiB, over the budget
        assert path_of(torch.empty(6, 1, 50), None, 3, False) == "split"   # 3 units cannot fill 2 threads
        assert path_of(layer1.contiguous(memory_format=torch.channels_last), None, 3, False) == "interleaved"
        assert path_of(torch.empty(6, 5), None, 3, False) == "interleaved"
    with cpu_path(0, 2):
        assert path_of(layer1, None, 3, False) == "split"


def test_slab_budget_env_is_validated():
    x = make_input((6, 4, 5), offset=1.0)
    weight, _, rm, rv = make_params(3, 4)
    for bad in ("-1", "abc", "12k"):
        with cpu_path(0):
            os.environ[ENV] = bad
            with pytest.raises(ValueError, match=ENV):
                tk.ts_batch_norm(x, weight, None, rm.clone(), rv.clone(), backend="cpu")


def test_slab_single_value_per_task_raises():
    x = make_input((3, 8, 1), offset=1.0)                       # one value per (task, channel)
    weight, _, rm, rv = make_params(3, 8)
    for budget in (0, HUGE):
        with cpu_path(budget, 1), pytest.raises(ValueError, match="more than 1 value per channel"):
            tk.ts_batch_norm(x, weight, None, rm.clone(), rv.clone(), backend="cpu")


@given(num_tasks=st.integers(1, 4), per_task=st.lists(st.integers(0, 4), min_size=4, max_size=4),
       channels=st.integers(4, 11), spatial=st.lists(st.integers(1, 7), min_size=1, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
       gate=st.sampled_from(["sigmoid", "none"]), use_bias=st.booleans(),
       activation=st.sampled_from([None, "relu"]), shuffle=st.booleans(), units_per_item=st.sampled_from([1, 2, 3, 0]),
       offset=st.sampled_from([2.0, 1e4]), seed=st.integers(0, 2**31 - 1))
def test_property_slab_equals_split(num_tasks, per_task, channels, spatial, dtype, gate, use_bias, activation,
                                    shuffle, units_per_item, offset, seed):
    g = torch.Generator().manual_seed(seed)
    per_task, ids = ragged_task_ids(per_task[:num_tasks], spatial, g, shuffle=shuffle)
    task_ids = ids if shuffle or len(set(per_task)) > 1 else None   # None: the task-major default layout
    shape = (ids.numel(), channels, *spatial)
    x = make_input(shape, dtype, offset=offset, generator=g)
    weight, bias, rm, rv = make_params(num_tasks, channels, param_dtype(dtype), bias=use_bias, generator=g)
    element = x.element_size()
    budget = units_per_item * max(per_task) * math.prod(spatial) * element * 2 if units_per_item else HUGE
    kw = dict(gate=gate, activation=activation)
    split, slab = both_paths(x, weight, bias, (rm, rv), task_ids, slab_budget=budget, **kw)
    # At |mean| = 1e4·std only float64 is compared with the reference: in fp32 the rounding of the mean
    # (~6e-4·std, amplified when a task's few values have a small sample std) is the tolerance itself, and a
    # relu mask at the threshold may flip (test_slab_large_mean_small_std covers fp32 with m >= 198).
    if offset < 100 or dtype == torch.float64:
        want = run("reference64", x, weight, bias, (rm, rv), task_ids=task_ids, **kw)
        if offset < 100:
            assert_matches(slab, want, dtype, x)
        else:
            for name, a, b in zip(LARGE_MEAN_TOL, slab, want):
                if b is not None:
                    tol = LARGE_MEAN_TOL[name]
                    torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()),
                                               msg=lambda m: f"{name}: {m}")


# ---- The interleaved (channels-last, 2-D) path: blocks of whole rows, merged in block order ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(11, 8, 48, 50), (11, 3, 70, 90), (11, 300, 9, 8), (11, 6, 5, 9, 70), (11, 37)],
                         ids=str)
def test_interleaved_independent_of_thread_count(dtype, shape):
    """Several blocks per sample (a ragged last one), ragged tasks, relu: the same bits at 1 and 2 threads."""
    g = torch.Generator().manual_seed(24)
    x = make_input(shape, dtype, channels_last=len(shape) >= 4, offset=3.0, generator=g)
    assert path_of(x, RAGGED, 5, False) == "interleaved"
    weight, bias, rm, rv = make_params(5, shape[1], param_dtype(dtype), generator=g)
    results = []
    for threads in (1, 2):
        with cpu_path(None, threads):
            results.append(run("cpu", x, weight, bias, (rm, rv), task_ids=RAGGED, activation="relu"))
    assert_bitwise(*results)
    want = run("reference64", x, weight, bias, (rm, rv), task_ids=RAGGED, activation="relu")
    assert_matches(results[0], want, dtype, x)


def test_interleaved_large_mean_many_blocks():
    """|mean| = 1e4·std over several blocks per sample: the block-order Chan merge keeps the variance."""
    g = torch.Generator().manual_seed(25)
    x = make_input((6, 4, 80, 64), torch.float32, channels_last=True, offset=1e4, generator=g)
    weight, bias, rm, rv = make_params(3, 4, generator=g)
    got = run("cpu", x, weight, bias, (rm, rv))
    want = run("reference64", x, weight, bias, (rm, rv))
    for name, a, b in zip(LARGE_MEAN_TOL, got, want):
        tol = LARGE_MEAN_TOL[name]
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()),
                                   msg=lambda m: f"{name}: {m}")
