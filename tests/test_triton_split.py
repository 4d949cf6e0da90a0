"""The Triton batch norm's work split: any cut of [N, C, S] into programs, spans and tiles gives the same
result up to rounding — several programs per sample, several tiles per program, partial rows of ragged tasks
merged in float64 — and stays exact for |mean| >> std (runs under TRITON_INTERPRET=1 on the CPU)."""
from __future__ import annotations

import pytest
import torch

import tsbn_kernels as tk
from conftest import make_input, make_params
from tsbn_kernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in tk.available_backends(DEVICE),
                                reason="needs Triton (a GPU, or TRITON_INTERPRET=1 on the CPU)")

# (block_c, block_s, programs): one program per sample and channel block; several spans per sample with one
# tile each (4, 8, 1000); several spans of several tiles; one tile covering everything.
CUTS = [(2, 4, 1), (4, 4, 64), (2, 2, 24), (4, 8, 1000), (8, 64, 1)]


def _run(x, weight, bias, rm, rv, ids, grad, cut):
    from tsbn_kernels.kernels import triton_ts_batch_norm as tbn

    x = x.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True)
    rm, rv = rm.clone(), rv.clone()
    with tbn.tile_config(*cut[:2], programs=cut[2]):
        grid = tbn.grid_for(x, True)
        y = tk.ts_batch_norm(x, w, b, rm, rv, task_ids=ids, activation="relu", backend="triton")
        grads = torch.autograd.grad(y, (x, w, b), grad)
    return grid, (y, *grads, rm, rv)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("offset", [2.0, 1e4])
def test_every_cut_matches_the_float64_reference(channels_last, offset):
    g = torch.Generator().manual_seed(5)
    x = make_input((7, 6, 5, 7), torch.float32, offset=offset, channels_last=channels_last, generator=g,
                   device=DEVICE)
    weight, bias, rm, rv = make_params(4, 6, torch.float32, generator=g, device=DEVICE)
    ids = torch.tensor([2, 0, 2, 2, 0, 3, 0], device=DEVICE)               # ragged; task 1 absent
    grad = torch.randn(x.shape, generator=g).to(DEVICE)
    x64 = x.double().requires_grad_(True)
    w64, b64 = weight.double().requires_grad_(True), bias.double().requires_grad_(True)
    rm64, rv64 = rm.double(), rv.double()
    want = reference.ts_batch_norm(x64, w64, b64, rm64, rv64, task_ids=ids, activation="relu")
    want = (want, *torch.autograd.grad(want, (x64, w64, b64), grad.double()), rm64, rv64)
    mean_rounding = torch.finfo(torch.float32).eps * x.abs().max().item() if offset > 100 else 0.0
    seen = set()
    for cut in CUTS:
        grid, got = _run(x, weight, bias, rm, rv, ids, grad, cut)
        seen.add((grid.splits > 1, grid.iters > 1))
        for name, a, b in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var"), got, want):
            # x̂ is O(1) whatever the offset, but a mean stored in fp32 is itself rounded to half an ulp of |x|,
            # which shifts x̂ by up to that over std (about 1 here); dweight = Σ dy·x̂ carries it times Σ dy.
            tol = 2e-4 + 2 * mean_rounding * (5 if name == "dweight" else 1)
            scale = max(1.0, b.abs().max().item()) if name.startswith("running") else 1.0
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * scale, msg=lambda m: f"{cut} {name}: {m}")
        assert torch.all(got[2][1] == 0) and torch.all(got[4][1] == rm[1])   # the absent task is untouched
    assert {(True, False), (True, True), (False, True), (False, False)} <= seen


def test_layer_norm_backward_splits_samples_into_several_programs():
    from tsbn_kernels.kernels import triton_ts_layer_norm as tln

    g = torch.Generator().manual_seed(6)
    x = make_input((6, 9, 40), torch.float32, offset=3.0, generator=g, device=DEVICE).requires_grad_(True)
    weight = torch.randn(3, 40, generator=g).to(DEVICE).requires_grad_(True)
    bias = torch.randn(3, 40, generator=g).to(DEVICE).requires_grad_(True)
    batch, tokens, d, block_d, block_m, row_blocks = tln._geometry(x, 1, tile_values=2048)
    splits, iters = tln._backward_split(batch, row_blocks, x.device)
    assert splits > 1 and iters > 1
    y = tk.ts_layer_norm(x, weight, bias, backend="triton")
    grad = torch.randn(x.shape, generator=g).to(DEVICE)
    got = torch.autograd.grad(y, (x, weight, bias), grad)
    leaves = [t.detach().double().requires_grad_(True) for t in (x, weight, bias)]
    want = torch.autograd.grad(reference.ts_layer_norm(*leaves), leaves, grad.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-4)
