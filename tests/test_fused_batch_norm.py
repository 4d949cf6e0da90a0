"""Every fused ts_batch_norm backend against the float64 reference: every mode, layout, dtype and task layout.

Backends are the ones available on this machine (cpu; triton under TRITON_INTERPRET=1; cuda on a GPU), so
the same tests cover each kernel wherever it can run. Expected values come from the reference evaluated in
float64 on the very input the kernel saw (rounded to its dtype), so tolerances measure the kernel alone.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tsbn_kernels as tk
from conftest import make_input, make_params, ragged_task_ids
from tsbn_kernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED = [b for b in tk.available_backends(DEVICE) if b != "eager"]
pytestmark = pytest.mark.skipif(not FUSED, reason="no fused backend built")

# Output tolerance per input dtype: the kernel's fp32 accumulation against the float64 truth, plus the
# rounding of y itself to the dtype.
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def run(backend, x, weight, bias, stats, *, task_ids=None, training=True, momentum=0.1, gate="sigmoid",
        activation=None, eps=1e-5, grad_seed=7, keep_strides=False):
    """Forward and backward; returns y, dx, dweight, dbias and the updated running statistics. x is cloned
    (a non-dense view becomes contiguous) unless keep_strides."""
    x = (x.detach() if keep_strides else x.detach().clone()).requires_grad_(True)
    weight = None if weight is None else weight.detach().clone().requires_grad_(True)
    bias = None if bias is None else bias.detach().clone().requires_grad_(True)
    rm, rv = (None, None) if stats[0] is None else (stats[0].clone(), stats[1].clone())
    num_tasks = next(t.shape[0] for t in (weight, bias, rm) if t is not None)
    if backend == "reference64":
        to64 = lambda t: None if t is None else t.detach().double().requires_grad_(t.requires_grad)  # noqa
        x64, w64, b64 = to64(x), to64(weight), to64(bias)
        rm64, rv64 = (None, None) if rm is None else (rm.double(), rv.double())
        y = reference.ts_batch_norm(x64, w64, b64, rm64, rv64, task_ids=task_ids, num_tasks=num_tasks,
                                    training=training, momentum=momentum, eps=eps, gate=gate,
                                    activation=activation)
        grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
        grad_y = grad_y.to(x.device)  # drawn on the CPU (the same values on every device), used where y is
        grads = torch.autograd.grad(y, [t for t in (x64, w64, b64) if t is not None], grad_y.to(x.dtype).double())
        return (y, *_pad(grads, w64, b64), rm64, rv64)
    y = tk.ts_batch_norm(x, weight, bias, rm, rv, task_ids=task_ids, training=training, momentum=momentum,
                         eps=eps, gate=gate, activation=activation, backend=backend, num_tasks=num_tasks)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    grads = torch.autograd.grad(y, [t for t in (x, weight, bias) if t is not None], grad_y.to(x.device, x.dtype))
    return (y, *_pad(grads, weight, bias), rm, rv)


def _pad(grads, weight, bias):
    grads = list(grads)
    dx = grads.pop(0)
    dw = grads.pop(0) if weight is not None else None
    db = grads.pop(0) if bias is not None else None
    return dx, dw, db


def assert_matches(got, want, dtype, x):
    tol = TOL[dtype]
    names = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None, name
            continue
        scale = max(1.0, w.abs().max().item())
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")
    assert got[0].dtype == x.dtype and got[0].shape == x.shape


def layout_of(t):
    if t.dim() == 3 and not t.is_contiguous() and t.transpose(1, 2).is_contiguous():
        return "channel_minor"
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    return "contiguous" if t.is_contiguous() else "other"


SHAPES = [(6, 5), (6, 3, 7), (6, 4, 5, 3), (6, 3, 2, 3, 4), (9, 17, 3, 5)]


LAYOUTS = [(shape, False) for shape in SHAPES] + [(shape, True) for shape in SHAPES if len(shape) >= 3]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape,channels_last", LAYOUTS, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_modes_float64(backend, shape, channels_last, training):
    g = torch.Generator().manual_seed(hash((shape, channels_last, training)) % 2**31)
    x = make_input(shape, torch.float64, channels_last=channels_last, offset=2.0, generator=g, device=DEVICE)
    weight, bias, rm, rv = make_params(3, shape[1], torch.float64, generator=g, device=DEVICE)
    for gate, activation, use_bias in (("sigmoid", None, False), ("sigmoid", "relu", True), ("none", "relu", True)):
        b = bias if use_bias else None
        got = run(backend, x, weight, b, (rm, rv), training=training, gate=gate, activation=activation)
        want = run("reference64", x, weight, b, (rm, rv), training=training, gate=gate, activation=activation)
        assert_matches(got, want, torch.float64, x)
        assert layout_of(got[0]) == layout_of(x) and layout_of(got[1]) == layout_of(x)


def strided_view(kind: str, shape, generator) -> torch.Tensor:
    """A float64 view of ``shape`` that is neither contiguous nor channels-last, as slicing, expanding or permuting
    a tensor leaves it."""
    N, C, H, W = shape
    base = make_input((N, 2 * C, H, 2 * W), torch.float64, offset=2.0, generator=generator, device=DEVICE)
    if kind == "channel-sliced":
        return base[:, ::2, :, :W]
    if kind == "position-sliced":
        return base[:, :C, :, ::2]
    if kind == "expanded":                      # stride 0 along W: every row of a plane one value
        return base[:, :C, :, :1].expand(N, C, H, W)
    return base[:, :C, :W, :H].contiguous().transpose(2, 3)   # "spatial-permuted": dense, H and W swapped


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["channel-sliced", "position-sliced", "expanded", "spatial-permuted"])
@pytest.mark.parametrize("training", [True, False])
def test_strided_views(backend, kind, training):
    """The kernel gets the view itself (not a contiguous clone) and gives what the reference gives on its values."""
    g = torch.Generator().manual_seed(hash((kind, training)) % 2**31)
    x = strided_view(kind, (6, 5, 4, 3), g)
    assert layout_of(x) == "other" and x.shape == (6, 5, 4, 3)
    weight, bias, rm, rv = make_params(3, 5, torch.float64, generator=g, device=DEVICE)
    for gate, activation, use_bias in (("sigmoid", None, False), ("sigmoid", "relu", True), ("none", "relu", True)):
        b = bias if use_bias else None
        got = run(backend, x, weight, b, (rm, rv), training=training, gate=gate, activation=activation,
                  keep_strides=True)
        want = run("reference64", x, weight, b, (rm, rv), training=training, gate=gate, activation=activation)
        assert_matches(got, want, torch.float64, x)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision_against_float64(backend, dtype, channels_last):
    g = torch.Generator().manual_seed(3)
    x = make_input((8, 6, 5, 7), dtype, channels_last=channels_last, offset=3.0, generator=g, device=DEVICE)
    weight, bias, rm, rv = make_params(4, 6, torch.float32, generator=g, device=DEVICE)
    got = run(backend, x, weight, bias, (rm, rv), activation="relu")
    want = run("reference64", x, weight, bias, (rm, rv), activation="relu")
    assert_matches(got, want, dtype, x)
    assert got[2].dtype == torch.float32 and got[4].dtype == torch.float32


@pytest.mark.skipif("cpu" not in FUSED, reason="the C++ CPU kernel is not built")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_cpu_low_precision_rounds_once(dtype, channels_last, activation):
    """The CPU kernel widens fp16/bf16 exactly, computes in fp32 and rounds each output once to nearest-even:
    the fp32 kernel on the same values, rounded (this pins the hand-written bf16 bit conversions)."""
    g = torch.Generator().manual_seed(11)
    x = make_input((6, 8, 9, 7), dtype, channels_last=channels_last, offset=2.0, generator=g, device="cpu")
    weight, bias, rm, rv = make_params(3, 8, torch.float32, generator=g, device="cpu")
    grad_y = torch.randn(x.shape, generator=g).to(dtype)
    results = []
    for inp, grad in ((x, grad_y), (x.float(), grad_y.float())):
        inp = inp.detach().clone().requires_grad_(True)
        w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        y = tk.ts_batch_norm(inp, w, b, rm.clone(), rv.clone(), activation=activation, backend="cpu")
        results.append((y, *torch.autograd.grad(y, (inp, w, b), grad)))
    (y, dx, dw, db), (y32, dx32, dw32, db32) = results
    for low, wide in ((y, y32), (dx, dx32)):
        # The statistics may be summed in another order for another element size (last-bit differences that
        # can move a rounding); a wrong rounding mode would miss on about half of the elements.
        rounded = wide.to(dtype)
        miss = low != rounded
        assert miss.float().mean() < 0.01
        spacing = torch.finfo(dtype).eps * rounded.float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((low.float() - rounded.float()).abs() <= spacing)[miss].all()
    torch.testing.assert_close(dw, dw32, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, db32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_params_in_input_dtype(backend):
    g = torch.Generator().manual_seed(4)
    x = make_input((6, 5, 4, 4), torch.bfloat16, offset=1.0, generator=g, device=DEVICE)
    weight, bias, rm, rv = make_params(3, 5, torch.bfloat16, generator=g, device=DEVICE)
    got = run(backend, x, weight, bias, (rm, rv))
    want = run("reference64", x, weight, bias, (rm, rv))
    assert got[2].dtype == torch.bfloat16 and got[4].dtype == torch.bfloat16
    assert_matches(got, want, torch.bfloat16, x)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_mean_small_std(backend, channels_last):
    """|mean| = 1e4·std in fp32: any E[x²] − E[x]² formulation would lose the variance entirely."""
    g = torch.Generator().manual_seed(5)
    x = make_input((6, 4, 9, 11), torch.float32, channels_last=channels_last, offset=1e4, generator=g,
                   device=DEVICE)
    weight, bias, rm, rv = make_params(3, 4, generator=g, device=DEVICE)
    got = run(backend, x, weight, bias, (rm, rv))
    want = run("reference64", x, weight, bias, (rm, rv))
    # An fp32 mean of 1e4 is itself rounded to ~6e-4·std; dweight = Σ dy·x̂ carries that rounding times Σ dy.
    tolerances = {"y": 1e-3, "dx": 1e-3, "dweight": 5e-3, "dbias": 1e-3, "running_mean": 1e-3, "running_var": 1e-3}
    for name, a, b in zip(tolerances, got, want):
        tol = tolerances[name]
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", FUSED)
def test_ragged_and_empty_tasks(backend):
    g = torch.Generator().manual_seed(6)
    task_ids = torch.tensor([3, 0, 3, 3, 0, 4, 3, 0, 4], device=DEVICE)  # tasks 1 and 2 absent
    x = make_input((9, 5, 3, 4), torch.float64, offset=1.0, generator=g, device=DEVICE)
    weight, bias, rm, rv = make_params(5, 5, torch.float64, generator=g, device=DEVICE)
    got = run(backend, x, weight, bias, (rm, rv), task_ids=task_ids, activation="relu")
    want = run("reference64", x, weight, bias, (rm, rv), task_ids=task_ids, activation="relu")
    assert_matches(got, want, torch.float64, x)
    assert torch.all(got[2][[1, 2]] == 0) and torch.all(got[3][[1, 2]] == 0)
    assert torch.equal(got[4][[1, 2]], rm[[1, 2]]) and torch.equal(got[5][[1, 2]], rv[[1, 2]])


@pytest.mark.parametrize("backend", FUSED)
def test_cumulative_momentum_and_no_affine(backend):
    g = torch.Generator().manual_seed(8)
    x = make_input((6, 3, 8), torch.float64, generator=g, device=DEVICE)
    _, _, rm, rv = make_params(3, 3, torch.float64, generator=g, device=DEVICE)
    tracked = torch.tensor([0, 1, 2], device=DEVICE)
    got_rm, got_rv = rm.clone(), rv.clone()
    y = tk.ts_batch_norm(x, None, None, got_rm, got_rv, momentum=None, num_batches_tracked=tracked,
                         backend=backend)
    assert tracked.tolist() == [1, 2, 3]
    factor = torch.tensor([1.0, 1 / 2, 1 / 3], dtype=torch.float64, device=DEVICE)
    want = run("reference64", x, None, None, (rm, rv), momentum=factor)
    assert_matches((y, None, None, None, got_rm, got_rv), (want[0], None, None, None, *want[4:]), torch.float64, x)


@given(num_tasks=st.integers(1, 4), per_task=st.lists(st.integers(0, 3), min_size=4, max_size=4),
       channels=st.integers(1, 9), spatial=st.lists(st.integers(1, 5), min_size=0, max_size=2),
       gate=st.sampled_from(["sigmoid", "none"]), use_bias=st.booleans(),
       activation=st.sampled_from([None, "relu"]), channels_last=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_against_reference(num_tasks, per_task, channels, spatial, gate, use_bias, activation,
                                    channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    _, ids = ragged_task_ids(per_task[:num_tasks], spatial, g)
    ids = ids.to(DEVICE)
    shape = (ids.numel(), channels, *spatial)
    x = make_input(shape, torch.float64, channels_last=channels_last and len(shape) in (3, 4), offset=5.0,
                   generator=g, device=DEVICE)
    weight, bias, rm, rv = make_params(num_tasks, channels, torch.float64, bias=use_bias, generator=g,
                                       device=DEVICE)
    want = run("reference64", x, weight, bias, (rm, rv), task_ids=ids, gate=gate, activation=activation)
    for backend in FUSED:
        got = run(backend, x, weight, bias, (rm, rv), task_ids=ids, gate=gate, activation=activation)
        assert_matches(got, want, torch.float64, x)


@pytest.mark.parametrize("backend", FUSED)
def test_deterministic(backend):
    g = torch.Generator().manual_seed(9)
    x = make_input((12, 7, 13, 11), torch.float32, channels_last=True, offset=2.0, generator=g, device=DEVICE)
    weight, bias, rm, rv = make_params(3, 7, generator=g, device=DEVICE)
    first = run(backend, x, weight, bias, (rm, rv), activation="relu")
    second = run(backend, x, weight, bias, (rm, rv), activation="relu")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", FUSED)
def test_gradcheck(backend):
    g = torch.Generator().manual_seed(10)
    x = make_input((4, 2, 3), torch.float64, generator=g, device=DEVICE).requires_grad_(True)
    weight, bias, _, _ = make_params(2, 2, torch.float64, generator=g, device=DEVICE)
    ids = torch.tensor([1, 0, 1, 1], device=DEVICE)

    def fn(x, w, b):
        return tk.ts_batch_norm(x, w, b, task_ids=ids, activation="relu", backend=backend)

    assert torch.autograd.gradcheck(fn, (x, weight.requires_grad_(True), bias.requires_grad_(True)))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("training", [True, False])
def test_gradgradcheck(backend, training):
    g = torch.Generator().manual_seed(11)
    x = make_input((5, 2, 3), torch.float64, offset=3.0, generator=g, device=DEVICE).requires_grad_(True)
    weight, bias, rm, rv = make_params(2, 2, torch.float64, generator=g, device=DEVICE)
    ids = torch.tensor([1, 0, 1, 1, 0], device=DEVICE)

    def fn(x, w, b):
        return tk.ts_batch_norm(x, w, b, rm.clone(), rv.clone(), task_ids=ids, training=training, backend=backend)

    assert torch.autograd.gradgradcheck(fn, (x, weight.requires_grad_(True), bias.requires_grad_(True)))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("training,gate,activation", [(True, "sigmoid", None), (True, "none", "relu"),
                                                      (False, "sigmoid", "relu")])
def test_second_derivative_matches_reference(backend, training, gate, activation):
    """A gradient penalty through the layer: the fused backward under create_graph=True must carry the norm's
    own second-order terms (a detached backward would lose them silently) and equal the reference's."""
    g = torch.Generator().manual_seed(12)
    x0 = make_input((6, 3, 4, 5), torch.float64, offset=2.0, scale=1.5, generator=g, device=DEVICE)
    weight0, bias0, rm, rv = make_params(3, 3, torch.float64, generator=g, device=DEVICE)
    results = []
    for name in ("eager", backend):
        x, weight, bias = (t.clone().requires_grad_(True) for t in (x0, weight0, bias0))
        y = tk.ts_batch_norm(x, weight, bias, rm.clone(), rv.clone(), training=training, gate=gate,
                             activation=activation, backend=name)
        first = torch.autograd.grad(y.pow(3).sum(), (x, weight, bias), create_graph=True)
        penalty = sum(d.pow(2).sum() for d in first)
        results.append(first + torch.autograd.grad(penalty, (x, weight, bias)))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("backend", FUSED)
def test_module_under_torch_compile_fullgraph(backend):
    torch.manual_seed(0)
    bn = tk.TSBatchNorm2d(4, 3, activation="relu", backend=backend).to(DEVICE)
    twin = tk.TSBatchNorm2d(4, 3, activation="relu", backend="eager").to(DEVICE)
    twin.load_state_dict(bn.state_dict())
    x = make_input((6, 4, 5, 5), offset=1.0, device=DEVICE).requires_grad_(True)
    compiled = torch.compile(bn, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    grad_fused = x.grad.clone()
    x.grad = None
    want = twin(x)
    want.square().sum().backward()
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_fused, x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.running_var, twin.running_var)
    assert bn.num_batches_tracked.tolist() == [1, 1, 1]
