"""torch.func transforms over models with task-specific norms: backend="auto" runs the reference inside them (the
fused kernels are custom ops without functorch rules); an explicit fused backend says so."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import tsbn_kernels as tk
from conftest import make_input

FUSED = [b for b in tk.available_backends("cpu") if b != "eager"]


def per_sample_grads_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), tk.TSBatchNorm2d(4, 2, activation="relu"),
                        nn.Conv2d(4, 2, 1), tk.TSBatchNorm2d(2, 2))
    net.train()
    net(make_input((8, 3, 5, 5), offset=1.0))  # running statistics that are not the initial ones
    return net.eval()


def test_vmap_grad_per_sample_gradients_equal_the_loop():
    net = per_sample_grads_net()
    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = dict(net.named_buffers())
    x = make_input((3, 3, 5, 5), offset=0.5)

    def loss(p, sample):  # one sample, replicated for the two tasks
        out = functional_call(net, (p, buffers), (sample.unsqueeze(0).expand(2, -1, -1, -1),))
        return out.square().mean()

    batched = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        net.zero_grad()
        loss(dict(net.named_parameters()), x[i]).backward()
        for name, p in net.named_parameters():
            torch.testing.assert_close(batched[name][i], p.grad, rtol=1e-5, atol=1e-6)


def test_jacrev_through_layer_norm():
    ln = tk.TSLayerNorm(6, 2)
    x = make_input((2, 3, 6), offset=2.0)
    jac = jacrev(lambda x: ln(x))(x)
    twin = copy.deepcopy(ln)
    twin.backend = "eager"
    want = torch.autograd.functional.jacobian(lambda x: twin(x), x)
    torch.testing.assert_close(jac, want)


@pytest.mark.skipif(not FUSED, reason="no fused backend built")
@pytest.mark.parametrize("backend", FUSED)
def test_explicit_fused_backend_inside_a_transform_names_the_problem(backend):
    bn = tk.TSBatchNorm2d(4, 2, backend=backend).eval()
    with pytest.raises(ValueError, match="torch.func transform"):
        vmap(lambda x: bn(x.unsqueeze(0).expand(2, -1, -1, -1)))(make_input((3, 4, 2, 2)))
