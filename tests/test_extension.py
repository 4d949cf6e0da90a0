"""The compiled extension: build flags, the task_counts op on every layout, opcheck."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tsbn_kernels import _extension, validation

pytestmark = pytest.mark.skipif(not _extension.is_built(), reason=f"extension not built: {_extension.LOAD_ERROR}")


def test_extension_reports_its_build():
    assert _extension.has_op("task_counts")
    assert _extension.has_cuda_kernels() == torch.ops.tsbn.built_with_cuda()
    if torch.version.cuda is None:
        assert not _extension.has_cuda_kernels()


@given(ids=st.lists(st.integers(-3, 9), min_size=0, max_size=300), num_tasks=st.integers(1, 7),
       dtype=st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8]))
def test_task_counts_matches_bincount(ids, num_tasks, dtype):
    if dtype == torch.uint8:
        ids = [abs(i) for i in ids]
    t = torch.tensor(ids, dtype=dtype)
    got = torch.ops.tsbn.task_counts(t, num_tasks)
    below = sum(i < 0 for i in ids)
    above = sum(i >= num_tasks for i in ids)
    per_task = [sum(i == k for i in ids) for k in range(num_tasks)]
    assert got.tolist() == [below, *per_task, above]


def test_task_counts_large_input_is_split_and_exact():
    ids = torch.randint(-1, 5, (300_000,), generator=torch.Generator().manual_seed(0))
    got = torch.ops.tsbn.task_counts(ids, 4)
    want = torch.bincount(ids.clamp(-1, 4) + 1, minlength=6)
    assert torch.equal(got, want)


def test_task_counts_errors_are_python_exceptions():
    with pytest.raises(ValueError, match="1-D"):
        torch.ops.tsbn.task_counts(torch.zeros(2, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="num_tasks must be >= 1"):
        torch.ops.tsbn.task_counts(torch.zeros(2, dtype=torch.long), 0)
    with pytest.raises(TypeError, match="integer tensor"):
        torch.ops.tsbn.task_counts(torch.zeros(2), 3)


def test_validation_uses_the_op_and_agrees_with_fallback():
    ids = torch.tensor([0, 2, 2, 5, -1])
    fallback = torch.bincount(ids.clamp(-1, 3) + 1, minlength=5)
    assert torch.equal(validation.task_counts(ids, 3), fallback)


def test_opcheck():
    torch.library.opcheck(torch.ops.tsbn.task_counts.default, (torch.tensor([0, 1, 1, 3]), 3))


def test_cmake_library_loads_with_load_library():
    """The CMake build (built by `make test-cpp`) is loadable from Python without the pip-built module."""
    import os
    import subprocess
    import sys

    lib = os.environ.get("TSBN_CMAKE_LIB")
    if not lib:
        pytest.skip("TSBN_CMAKE_LIB not set (make test sets it after building CMakeLists.txt)")
    code = ("import torch; torch.ops.load_library(%r); "
            "print(torch.ops.tsbn.task_counts(torch.tensor([0, 1, 1, 4]), 2).tolist())" % lib)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[0, 1, 2, 1]"


def _bn_args(training=True, channels_last=False, ids=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, 5, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(3, 3, generator=g, dtype=torch.float64)
    rm, rv = torch.randn(3, 3, dtype=torch.float64), torch.rand(3, 3, dtype=torch.float64) + 0.5
    return (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True), rm, rv, ids, 3, training, 1e-5,
            True, True)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("ids", [None, torch.tensor([2, 0, 0, 2, 2, 0])])
def test_opcheck_batch_norm_ops(training, channels_last, ids):
    args = _bn_args(training, channels_last, ids)
    torch.library.opcheck(torch.ops.tsbn.ts_bn_forward.default, args)
    y, mean, invstd, var, count = torch.ops.tsbn.ts_bn_forward(*args)
    grad = torch.randn_like(y)
    x, w, b = (t.detach() for t in args[:3])
    torch.library.opcheck(torch.ops.tsbn.ts_bn_backward.default,
                          (grad, x, w, b, mean, invstd, ids, 3, training, True, True))
    torch.library.opcheck(torch.ops.tsbn.ts_bn_update_running_stats.default,
                          (args[3].clone(), args[4].clone(), mean, var, count, 0.1, None))


def test_direct_op_calls_reject_bad_input():
    x = torch.randn(6, 3, 4)
    with pytest.raises(ValueError, match="not divisible"):
        torch.ops.tsbn.ts_bn_forward(x, None, None, None, None, None, 4, True, 1e-5, True, False)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 3\)"):
        torch.ops.tsbn.ts_bn_forward(x, None, None, None, None, torch.tensor([0, 1, 2, 3, 0, 1]), 3, True, 1e-5,
                                     True, False)
    with pytest.raises(ValueError, match="weight must have shape"):
        torch.ops.tsbn.ts_bn_forward(x, torch.randn(3, 4), None, None, None, None, 3, True, 1e-5, True, False)
    with pytest.raises(ValueError, match="eval needs running_mean"):
        torch.ops.tsbn.ts_bn_forward(x, None, None, None, None, None, 3, False, 1e-5, True, False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch.ops.tsbn.ts_bn_forward(torch.randn(3, 2), None, None, None, None, None, 3, True, 1e-5, True, False)
    with pytest.raises(ValueError, match="2D to 5D"):
        torch.ops.tsbn.ts_bn_forward(torch.randn(6), None, None, None, None, None, 3, True, 1e-5, True, False)
    with pytest.raises(ValueError, match="grad_y has shape"):
        torch.ops.tsbn.ts_bn_backward(torch.randn(6, 3), x, None, None, torch.zeros(3, 3), torch.ones(3, 3), None, 3,
                                      True, True, False)
