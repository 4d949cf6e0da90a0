"""Each fused backend's kernels of the cross-process batch norm (tsbn_kernels.sync_batch_norm.SyncKernels: the C++
CPU ops, the C++ CUDA ops and Triton's): local statistics, apply, gradient sums and dx, against float64 formulas and
the eager reference; dx from the local sums is the backend's single-process backward bit for bit (on its split
path, whose passes these are: TSBN_CUDA_SLAB=0 for the CUDA ops), and dx from the sums of a batch split in two
"ranks" is the dx of the whole batch. Triton runs under TRITON_INTERPRET=1 on the CPU; the CUDA ops need a GPU."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tsbn_kernels as tk
from conftest import make_input, make_params
from tsbn_kernels import dispatch, reference
from tsbn_kernels.sync_batch_norm import SyncKernels, sync_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Every test, for each fused backend that has sync kernels on DEVICE (the CPU ops only on the CPU, the CUDA ops
# only on a GPU).
pytestmark = pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])


@pytest.fixture(autouse=True, scope="module")
def _cuda_split_path():
    # The sync passes are the split design's; the single-process CUDA ops they are compared with bit for bit would
    # take the slab path where a (task, channel) unit fits in shared memory. (Module scope: hypothesis refuses
    # function-scoped fixtures; only the CUDA ops read the variable.)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TSBN_CUDA_SLAB", "0")
        yield

EPS = 1e-5
FP32_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class Fused:
    kernels: SyncKernels
    forward: Callable     # the backend's single-process op, ts_bn_forward's signature
    backward: Callable    # (dy, x, w, b, mean, invstd, count, ids, T, training, sigmoid, relu) -> (dx, dw, db)
    ops: tuple            # stats, reduce, elemt as OpOverloads, for opcheck
    sums_dtype: torch.dtype


def _fused(backend: str) -> Fused:
    if backend not in tk.available_backends(DEVICE, "ts_batch_norm_sync"):
        pytest.skip(f"no {backend} sync kernels on {DEVICE} (triton on the CPU: TRITON_INTERPRET=1; cuda: a GPU "
                    "and a CUDA build of the extension)")
    kernels = sync_kernels(backend)
    ops = torch.ops.tsbn
    if backend == "triton":
        from tsbn_kernels.kernels import triton_ts_batch_norm as t

        return Fused(kernels, t.triton_bn_forward, t.triton_bn_backward, (ops.triton_bn_batch_stats.default,
                     ops.triton_bn_backward_reduce.default, ops.triton_bn_backward_elemt.default), torch.float32)
    return Fused(kernels, ops.ts_bn_forward,
                 lambda dy, x, w, b, mean, invstd, count, ids, T, training, sigmoid, relu:
                 ops.ts_bn_backward(dy, x, w, b, mean, invstd, ids, T, training, sigmoid, relu),
                 (ops.ts_bn_batch_stats.default, ops.ts_bn_backward_reduce.default,
                  ops.ts_bn_backward_elemt.default), torch.float64)


def _ids(layout: str, n: int, num_tasks: int, g: torch.Generator) -> torch.Tensor | None:
    """None (task-major blocks; n divisible by num_tasks), or ragged per-sample ids in a drawn order where task 1
    is absent and every other task has at least two samples."""
    if layout == "blocks":
        assert n % num_tasks == 0
        return None
    present = [t for t in range(num_tasks) if t != 1]
    base = torch.tensor(present * 2)
    extra = torch.tensor(present)[torch.randint(len(present), (n - base.numel(),), generator=g)]
    ids = torch.cat([base, extra])
    return ids[torch.randperm(n, generator=g)].to(DEVICE)


def _full_ids(ids: torch.Tensor | None, n: int, num_tasks: int) -> torch.Tensor:
    return reference.task_index(ids, n, num_tasks, torch.device(DEVICE))


def _grad_like(x: torch.Tensor, g: torch.Generator, *, other_layout: bool = False) -> torch.Tensor:
    """Random dy with x's dtype, in x's memory layout or (other_layout) the opposite one."""
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=x.dtype)
    same = torch.empty_like(x).copy_(dy)
    if not other_layout:
        return same
    if x.dim() >= 3 and x.stride(1) == 1:
        return same.contiguous()
    if x.dim() == 4:
        return same.contiguous(memory_format=torch.channels_last)
    return same.transpose(0, 1).contiguous().transpose(0, 1)      # [C, N, ...]-major: strides unlike x's


def _task_stats64(x: torch.Tensor, ids: torch.Tensor, num_tasks: int):
    """float64 (mean, biased var, element count) per task, plain torch."""
    x64 = x.double()
    dims = [0] + list(range(2, x.dim()))
    mean = torch.zeros(num_tasks, x.shape[1], dtype=torch.float64, device=x.device)
    var, count = torch.zeros_like(mean), torch.zeros(num_tasks, dtype=torch.float64, device=x.device)
    for t in range(num_tasks):
        rows = x64[ids == t]
        if rows.shape[0]:
            mean[t] = rows.mean(dim=dims)
            var[t] = rows.var(dim=dims, unbiased=False)
            count[t] = rows.numel() / x.shape[1]
    return mean, var, count


def _per_sample(table: torch.Tensor, ids: torch.Tensor, ndim: int) -> torch.Tensor:
    return table.index_select(0, ids).reshape(ids.shape[0], table.shape[1], *([1] * (ndim - 2)))


def _masked_dy64(dy, x, weight, bias, mean, invstd, ids, num_tasks, sigmoid, relu):
    """dy in float64, zero where relu is on and the y recomputed (in float64) from these statistics is not > 0."""
    dy64 = dy.double()
    if relu:
        y = reference.ts_batch_norm_with_statistics(
            x.double(), None if weight is None else weight.double(), None if bias is None else bias.double(),
            mean.double(), invstd.double(), task_ids=ids, num_tasks=num_tasks,
            gate="sigmoid" if sigmoid else "none", activation=None)
        dy64 = torch.where(y > 0, dy64, torch.zeros_like(dy64))
    return dy64


def _sums64(dy, x, weight, bias, mean, invstd, ids, num_tasks, sigmoid, relu):
    """float64 Σ dy' and Σ dy'·(x − mean) per (task, channel)."""
    dy64 = _masked_dy64(dy, x, weight, bias, mean, invstd, ids, num_tasks, sigmoid, relu)
    centered = x.double() - _per_sample(mean.double(), ids, x.dim())
    reduce = lambda v: torch.zeros(num_tasks, x.shape[1], dtype=torch.float64, device=x.device).index_add(  # noqa
        0, ids, v.sum(dim=list(range(2, v.dim()))) if v.dim() > 2 else v)
    return reduce(dy64), reduce(dy64 * centered)


def _elemt64(dy, x, weight, bias, mean, invstd, sum_dy, sum_dy_xmu, count, ids, num_tasks, sigmoid, relu):
    """SyncKernels.elemt's formula in float64: a·invstd·(dy' − sum_dy/m − (x − mean)·invstd²·sum_dy_xmu/m)."""
    dy64 = _masked_dy64(dy, x, weight, bias, mean, invstd, ids, num_tasks, sigmoid, relu)
    a = torch.ones_like(mean, dtype=torch.float64) if weight is None else \
        torch.sigmoid(weight.double()) if sigmoid else weight.double()
    r, m = invstd.double(), count.double().clamp_min(1).unsqueeze(1)
    tab = lambda t: _per_sample(t, ids, x.dim())  # noqa: E731
    centered = x.double() - tab(mean.double())
    return tab(a * r) * (dy64 - tab(sum_dy.double() / m) - centered * tab(r * r * sum_dy_xmu.double() / m))


def _reference_dx(x, dy, weight, bias, ids, num_tasks, sigmoid, relu):
    """The autograd dx of the eager reference in training mode, in float64."""
    x64 = x.double().requires_grad_(True)
    y = reference.ts_batch_norm(x64, None if weight is None else weight.double(),
                                None if bias is None else bias.double(), task_ids=ids, num_tasks=num_tasks,
                                training=True, eps=EPS, gate="sigmoid" if sigmoid else "none",
                                activation="relu" if relu else None)
    return torch.autograd.grad(y, x64, dy.double())[0]


def _assert_dx_close(got, want, dtype, msg=""):
    # fp32: a few ulps of |dx| from fp32 statistics and sums; bf16: the rounding of dx itself, 2^-8 relative.
    scale = want.abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * max(scale, 1.0), msg=msg)


# (shape, memory layout, task layout, tasks, dtype): odd 4-D, 2-D [N, C], 3-D [N, C, L], 5-D, both layouts.
CASES = [
    ((7, 5, 3, 5), "nchw", "ragged", 4, torch.float32),
    ((7, 5, 3, 5), "channels_last", "ragged", 4, torch.bfloat16),
    ((6, 5, 3, 5), "channels_last", "blocks", 3, torch.float32),
    ((6, 5, 3, 5), "nchw", "blocks", 3, torch.bfloat16),
    ((9, 5), "nchw", "ragged", 4, torch.float32),
    ((6, 3), "nchw", "blocks", 2, torch.bfloat16),
    ((7, 3, 9), "nchw", "ragged", 4, torch.bfloat16),
    ((6, 3, 9), "channels_last", "blocks", 3, torch.float32),
    ((6, 2, 2, 3, 3), "channels_last", "ragged", 3, torch.float32),
]


def _case_id(case) -> str:
    shape, memory, tasks, _, dtype = case
    return f"{'x'.join(map(str, shape))}-{memory}-{tasks}-{str(dtype).split('.')[-1]}"


def _inputs(case, g, *, offset=3.0, scale=1.0, weight=True, bias=True):
    shape, memory, layout, num_tasks, dtype = case
    x = make_input(shape, dtype, offset=offset, scale=scale, channels_last=memory == "channels_last", generator=g,
                   device=DEVICE)
    w, b, _, _ = make_params(num_tasks, shape[1], torch.float32, generator=g, device=DEVICE)
    return x, (w if weight else None), (b if bias else None), _ids(layout, shape[0], num_tasks, g), num_tasks


# bf16 spaces values 64 apart at 1e4: |mean| = 1e4·std would leave it no spread to measure.
@pytest.mark.parametrize("case,offset", [pytest.param(case, offset, id=f"{_case_id(case)}-{offset:g}")
                                         for case in CASES for offset in (3.0, 1e4)
                                         if offset < 100 or case[-1] == torch.float32])
def test_stats_are_the_float64_mean_biased_variance_and_count(backend, case, offset):
    fused = _fused(backend)
    g = torch.Generator().manual_seed(11)
    x, _, _, ids, num_tasks = _inputs(case, g, offset=offset)
    mean, var, count = fused.kernels.stats(x, ids, num_tasks)
    assert mean.dtype == var.dtype == count.dtype == torch.float32
    want_mean, want_var, want_count = _task_stats64(x, _full_ids(ids, x.shape[0], num_tasks), num_tasks)
    torch.testing.assert_close(count.double(), want_count, rtol=0, atol=0)
    # The fp32 mean is rounded to half an ulp of |x|; the float64 merge of the partial rows then moves the
    # variance by about that times the spread (DESIGN.md §4's "exact when |mean| >> std", up to this rounding).
    rounding = FP32_EPS * x.double().abs().max().item()
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=rounding)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-5, atol=1e-6 + 8 * rounding)
    if ids is not None:                                    # the absent task: zeros
        assert mean[1].eq(0).all() and var[1].eq(0).all() and count[1] == 0


def _local_statistics(fused, x, ids, num_tasks):
    mean, var, count = fused.kernels.stats(x, ids, num_tasks)
    return mean, torch.rsqrt(var + EPS), count


# (sigmoid gate, relu, (weight, bias)): every case runs two of them, every combination runs on several cases.
GATINGS = [(True, True, (True, True)), (False, False, (True, False)), (True, False, (False, True)),
           (False, True, (False, False))]


def _gating_id(sigmoid, relu, affine) -> str:
    return "-".join(name for name, on in (("sigmoid", sigmoid), ("relu", relu), ("weight", affine[0]),
                                          ("bias", affine[1])) if on) or "plain"


@pytest.mark.parametrize("case,sigmoid,relu,affine", [
    pytest.param(case, *gating, id=f"{_case_id(case)}-{_gating_id(*gating)}")
    for i, case in enumerate(CASES) for gating in (GATINGS[i % 4], GATINGS[(i + 2) % 4])])
def test_reduce_sums_are_the_float64_sums_of_the_masked_gradient(backend, case, sigmoid, relu, affine):
    fused = _fused(backend)
    g = torch.Generator().manual_seed(12)
    x, w, b, ids, num_tasks = _inputs(case, g, weight=affine[0], bias=affine[1])
    mean, invstd, _ = _local_statistics(fused, x, ids, num_tasks)
    dy = _grad_like(x, g)
    sum_dy, sum_dy_xmu = fused.kernels.reduce(dy, x, w, b, mean, invstd, ids, num_tasks, sigmoid, relu)
    assert sum_dy.dtype == sum_dy_xmu.dtype == fused.sums_dtype
    full = _full_ids(ids, x.shape[0], num_tasks)
    want_dy, want_dy_xmu = _sums64(dy, x, w, b, mean, invstd, full, num_tasks, sigmoid, relu)
    terms = x[0, 0].numel() * x.shape[0]
    for got, want in ((sum_dy, want_dy), (sum_dy_xmu, want_dy_xmu)):
        # fp32 accumulation of a few hundred O(1) terms
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * terms)
    # dy in another memory layout than x is laid out like x first, as the single-process backward does.
    other = _grad_like(x, g, other_layout=True).copy_(dy)
    assert other.stride() != x.stride()
    again = fused.kernels.reduce(other, x, w, b, mean, invstd, ids, num_tasks, sigmoid, relu)
    assert torch.equal(again[0], sum_dy) and torch.equal(again[1], sum_dy_xmu)


def _check_elemt_is_the_backward(fused, case, sigmoid, relu, affine, seed, other_layout):
    g = torch.Generator().manual_seed(seed)
    x, w, b, ids, num_tasks = _inputs(case, g, weight=affine[0], bias=affine[1])
    dy = _grad_like(x, g, other_layout=other_layout)
    _, mean, invstd, _, count = fused.forward(x, w, b, None, None, ids, num_tasks, True, EPS, sigmoid, relu)
    sums = fused.kernels.reduce(dy, x, w, b, mean, invstd, ids, num_tasks, sigmoid, relu)
    dx = fused.kernels.elemt(dy, x, w, b, mean, invstd, *sums, count, ids, num_tasks, sigmoid, relu)
    want = fused.backward(dy, x, w, b, mean, invstd, count, ids, num_tasks, True, sigmoid, relu)[0]
    assert dx.dtype == x.dtype and dx.stride() == want.stride()
    assert torch.equal(dx, want), "elemt with the local sums is not the single-process backward bit for bit"
    _assert_dx_close(dx, _reference_dx(x, dy, w, b, ids, num_tasks, sigmoid, relu), x.dtype, _case_id(case))
    # The sync path's own statistics: the stats op, invstd from the variance; same kernels, same bits.
    mean2, invstd2, count2 = _local_statistics(fused, x, ids, num_tasks)
    assert torch.equal(mean2, mean) and torch.equal(count2, count)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_elemt_with_the_local_sums_is_the_single_process_backward(backend, case):
    _check_elemt_is_the_backward(_fused(backend), case, True, True, (True, True), 13, other_layout=False)


@settings(max_examples=12)
@given(case=st.sampled_from(CASES), sigmoid=st.booleans(), relu=st.booleans(),
       affine=st.tuples(st.booleans(), st.booleans()), seed=st.integers(0, 2 ** 16), other_layout=st.booleans())
def test_elemt_is_the_backward_for_any_gate_affine_and_layout(backend, case, sigmoid, relu, affine, seed,
                                                               other_layout):
    _check_elemt_is_the_backward(_fused(backend), case, sigmoid, relu, affine, seed, other_layout)


def _merge64(parts):
    """Chan's merge in float64 of [(mean, biased var, count)] of several ranks: the sync path's global statistics."""
    counts = torch.stack([c.double() for _, _, c in parts])                       # [R, T]
    means = torch.stack([m.double() for m, _, _ in parts])                        # [R, T, C]
    m2s = torch.stack([v.double() * c.double().unsqueeze(1) for _, v, c in parts])
    total = counts.sum(0)
    mean = (counts.unsqueeze(2) * means).sum(0) / total.clamp_min(1).unsqueeze(1)
    m2 = (m2s + counts.unsqueeze(2) * (means - mean) ** 2).sum(0)
    return mean, m2 / total.clamp_min(1).unsqueeze(1), total


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("sigmoid,relu", [(True, True), (False, False)])
def test_dx_from_the_sums_of_two_ranks_is_the_dx_of_the_whole_batch(backend, case, sigmoid, relu):
    fused = _fused(backend)
    g = torch.Generator().manual_seed(14)
    x, w, b, ids, num_tasks = _inputs(case, g)
    dy = _grad_like(x, g)
    full = _full_ids(ids, x.shape[0], num_tasks)
    cut = 2                                                   # rank 0 lacks some tasks; rank 1 has the rest
    ranks = [(x[:cut], dy[:cut], full[:cut]), (x[cut:], dy[cut:], full[cut:])]
    stats = [fused.kernels.stats(xr, ir, num_tasks) for xr, _, ir in ranks]
    mean, var, total = (t.float() for t in _merge64(stats))
    invstd = torch.rsqrt(var + EPS)
    sums = [fused.kernels.reduce(dyr, xr, w, b, mean, invstd, ir, num_tasks, sigmoid, relu)
            for xr, dyr, ir in ranks]
    sum_dy, sum_dy_xmu = (sums[0][i] + sums[1][i] for i in range(2))
    dx = torch.cat([fused.kernels.elemt(dyr, xr, w, b, mean, invstd, sum_dy, sum_dy_xmu, total, ir,
                                                 num_tasks, sigmoid, relu) for xr, dyr, ir in ranks])
    # Tight: the contract's formula on the same global tables, up to a few fp32 ulps and the rounding of dx to
    # bf16 — one ulp, 2^-7 relative, as the interpreter truncates where the GPU rounds to nearest.
    formula = torch.cat([_elemt64(dyr, xr, w, b, mean, invstd, sum_dy, sum_dy_xmu, total, ir, num_tasks, sigmoid,
                                  relu) for xr, dyr, ir in ranks])
    torch.testing.assert_close(dx.double(), formula, rtol=2e-6 if x.dtype == torch.float32 else 2 ** -7,
                               atol=2e-6 * formula.abs().max().item())
    # Loose: the whole batch's dx, from the reference in float64 and from the backend's single-process backward.
    want = _reference_dx(x, dy, w, b, ids, num_tasks, sigmoid, relu)
    _assert_dx_close(dx, want, x.dtype, _case_id(case))
    whole = fused.backward(dy, x, w, b, *_local_statistics(fused, x, ids, num_tasks)[:2],
                                   fused.kernels.stats(x, ids, num_tasks)[2], ids, num_tasks, True, sigmoid,
                                   relu)[0]
    _assert_dx_close(dx, whole.double(), x.dtype, _case_id(case))


@pytest.mark.parametrize("case", CASES[:4] + CASES[5:7], ids=_case_id)
@pytest.mark.parametrize("sigmoid,relu,affine", [(True, True, (True, True)), (False, False, (False, False)),
                                                 (False, True, (True, False))])
def test_registered_kernels_and_apply_is_the_eval_forward_with_those_statistics(backend, case, sigmoid, relu,
                                                                              affine):
    fused = _fused(backend)
    kernels = fused.kernels
    # What the dispatch op of the sync path runs for this backend.
    assert dispatch.resolve(backend, torch.device(DEVICE), "ts_batch_norm_sync")[1].args == (kernels,)
    g = torch.Generator().manual_seed(15)
    x, w, b, ids, num_tasks = _inputs(case, g, weight=affine[0], bias=affine[1])
    _, _, mean, var = make_params(num_tasks, x.shape[1], torch.float32, generator=g, device=DEVICE)
    y = kernels.apply(x, w, b, mean, var, ids, num_tasks, EPS, sigmoid, relu)
    want = reference.ts_batch_norm(x.double(), None if w is None else w.double(), None if b is None else b.double(),
                                   mean.double(), var.double(), task_ids=ids, num_tasks=num_tasks, training=False,
                                   eps=EPS, gate="sigmoid" if sigmoid else "none",
                                   activation="relu" if relu else None)
    assert y.dtype == x.dtype and y.shape == x.shape
    tol = 1e-5 if x.dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


def test_tables_of_the_wrong_shape_are_refused(backend):
    fused = _fused(backend)
    g = torch.Generator().manual_seed(16)
    x, w, b, ids, num_tasks = _inputs(CASES[0], g)
    dy = _grad_like(x, g)
    mean, invstd, count = _local_statistics(fused, x, ids, num_tasks)
    sums = fused.kernels.reduce(dy, x, w, b, mean, invstd, ids, num_tasks, True, False)
    args = dict(sum_dy=sums[0], sum_dy_xmu=sums[1], count=count)

    def elemt(**override):
        a = {**args, **override}
        return fused.kernels.elemt(dy, x, w, b, mean, invstd, a["sum_dy"], a["sum_dy_xmu"], a["count"],
                                            ids, num_tasks, True, False)

    for name, bad in (("sum_dy", sums[0][:, :-1]), ("sum_dy", sums[0].reshape(-1)),
                      ("sum_dy_xmu", sums[1][:-1]), ("count", count[:-1]), ("count", count.unsqueeze(1)),
                      ("count", torch.cat([count, count]))):
        with pytest.raises(ValueError, match=rf"\b{name} must have shape"):
            elemt(**{name: bad})
    with pytest.raises(ValueError, match=r"\bmean must have shape"):
        fused.kernels.reduce(dy, x, w, b, mean[:-1], invstd, ids, num_tasks, True, False)
    with pytest.raises(ValueError, match=r"\binvstd must have shape"):
        fused.kernels.elemt(dy, x, w, b, mean, invstd.t(), *sums, count, ids, num_tasks, True, False)
    elemt()                                                    # the right shapes pass


@pytest.mark.parametrize("channels_last,ids,affine", [(False, None, True), (True, [2, 0, 0, 2, 2, 0], True),
                                                      (True, None, False), (False, [2, 0, 0, 2, 2, 0], False)])
def test_opcheck_sync_ops(backend, channels_last, ids, affine):
    fused = _fused(backend)
    g = torch.Generator().manual_seed(17)
    x = make_input((6, 3, 2, 3), torch.float32, offset=2.0, channels_last=channels_last, generator=g, device=DEVICE)
    w, b, _, _ = make_params(3, 3, torch.float32, generator=g, device=DEVICE)
    w, b = (w, b) if affine else (None, None)
    ids = None if ids is None else torch.tensor(ids, device=DEVICE)
    dy = _grad_like(x, g)
    torch.library.opcheck(fused.ops[0], (x, ids, 3))
    mean, var, count = fused.kernels.stats(x, ids, 3)
    invstd = torch.rsqrt(var + EPS)
    torch.library.opcheck(fused.ops[1],
                          (dy, x, w, b, mean, invstd, ids, 3, True, True))
    sums = fused.kernels.reduce(dy, x, w, b, mean, invstd, ids, 3, True, True)
    torch.library.opcheck(fused.ops[2],
                          (dy, x, w, b, mean, invstd, *sums, count.double(), ids, 3, True, True))
