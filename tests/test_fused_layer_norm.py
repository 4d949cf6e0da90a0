"""Every fused ts_layer_norm backend against the float64 reference (triton under TRITON_INTERPRET=1 here)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tsbn_kernels as tk
from conftest import make_input
from tsbn_kernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED = [b for b in tk.available_backends(DEVICE, "ts_layer_norm") if b != "eager"]
pytestmark = pytest.mark.skipif(not FUSED, reason="no fused layer-norm backend available here")
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def run(backend, x, weight, bias, task_ids=None, gate="sigmoid", seed=0):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, weight, bias)]
    if backend == "reference64":
        leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in leaves]
        y = reference.ts_layer_norm(*leaves, task_ids=task_ids, gate=gate)
    else:
        y = tk.ts_layer_norm(*leaves, task_ids=task_ids, gate=gate, backend=backend)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(x.dtype)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], grad.to(y.dtype))
    grads = list(grads)
    return [y] + [grads.pop(0) if t is not None else None for t in leaves]


def check(got, want, dtype):
    for name, g, w in zip(("y", "dx", "dweight", "dbias"), got, want):
        if w is None:
            assert g is None
            continue
        tol = TOL[dtype]
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * max(1.0, w.abs().max().item()),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate,use_bias", [("sigmoid", False), ("sigmoid", True), ("none", True)])
def test_against_reference(backend, dtype, gate, use_bias):
    g = torch.Generator().manual_seed(1)
    x = make_input((6, 5, 40), dtype, offset=3.0, generator=g, device=DEVICE)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.randn(3, 40, generator=g, dtype=param_dtype).to(DEVICE)
    bias = torch.randn(3, 40, generator=g, dtype=param_dtype).to(DEVICE) if use_bias else None
    got = run(backend, x, weight, bias, gate=gate)
    want = run("reference64", x, weight, bias, gate=gate)
    assert got[0].dtype == dtype
    check(got, want, dtype)


@pytest.mark.parametrize("backend", FUSED)
def test_ragged_task_ids_and_multi_dim_shape(backend):
    g = torch.Generator().manual_seed(2)
    x = make_input((5, 3, 2, 6), torch.float64, generator=g, device=DEVICE)
    weight = torch.randn(4, 2, 6, dtype=torch.float64, generator=g).to(DEVICE)
    bias = torch.randn(4, 2, 6, dtype=torch.float64, generator=g).to(DEVICE)
    ids = torch.tensor([3, 0, 3, 3, 0], device=DEVICE)
    got = run(backend, x, weight, bias, task_ids=ids)
    want = run("reference64", x, weight, bias, task_ids=ids)
    check(got, want, torch.float64)
    assert torch.all(got[2][[1, 2]] == 0)


@given(batch_per_task=st.integers(1, 3), tasks=st.integers(1, 3), tokens=st.integers(1, 6), d=st.integers(1, 70),
       seed=st.integers(0, 1000))
def test_property(batch_per_task, tasks, tokens, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = make_input((batch_per_task * tasks, tokens, d), torch.float64, offset=10.0, generator=g, device=DEVICE)
    weight = torch.randn(tasks, d, dtype=torch.float64, generator=g).to(DEVICE)
    want = run("reference64", x, weight, None)
    for backend in FUSED:
        check(run(backend, x, weight, None), want, torch.float64)


@pytest.mark.parametrize("backend", FUSED)
def test_module_compiles_fullgraph(backend):
    ln = tk.TSLayerNorm(16, 2, backend=backend).to(DEVICE)
    x = make_input((4, 3, 16), device=DEVICE)
    torch.testing.assert_close(torch.compile(ln, fullgraph=True, backend="aot_eager")(x),
                               tk.ts_layer_norm(x, ln.weight, backend="eager"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_gradgradcheck(backend):
    g = torch.Generator().manual_seed(5)
    x = make_input((4, 3, 6), torch.float64, offset=2.0, generator=g, device=DEVICE).requires_grad_(True)
    weight = torch.randn(2, 6, dtype=torch.float64, generator=g).to(DEVICE).requires_grad_(True)
    bias = torch.randn(2, 6, dtype=torch.float64, generator=g).to(DEVICE).requires_grad_(True)
    ids = torch.tensor([1, 0, 0, 1], device=DEVICE)

    def fn(x, w, b):
        return tk.ts_layer_norm(x, w, b, task_ids=ids, backend=backend)

    assert torch.autograd.gradgradcheck(fn, (x, weight, bias))
