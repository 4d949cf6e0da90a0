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


def test_forward_mode_ad_tangents_equal_finite_differences():
    """Dual tensors (torch.autograd.forward_ad) through both ops and a training-mode module: the fused custom ops have
    no jvp rules and dropped the tangent (a plain output, no error); backend="auto" now runs the reference there.
    The running statistics stay constants: no tangent reaches the buffers."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    bn = tk.TSBatchNorm2d(3, 2, gate="none", momentum=None).double()
    x = make_input((4, 3, 2, 2), torch.float64, offset=1.0)
    tangent = torch.randn_like(x)
    w_ln = torch.randn(2, 5, dtype=torch.float64)
    x_ln = make_input((4, 3, 5), torch.float64, offset=2.0)
    t_ln = torch.randn_like(x_ln)
    with fwAD.dual_level():
        y = bn(fwAD.make_dual(x, tangent))
        got = fwAD.unpack_dual(y).tangent
        got_ln = fwAD.unpack_dual(tk.ts_layer_norm(fwAD.make_dual(x_ln, t_ln), w_ln)).tangent
        assert fwAD.unpack_dual(bn.running_mean).tangent is None
        assert fwAD.unpack_dual(bn.running_var).tangent is None
    eps = 1e-6

    def central(f, x, t):
        return (f(x + eps * t) - f(x - eps * t)) / (2 * eps)

    twin = copy.deepcopy(bn).eval()
    twin.track_running_stats, twin.running_mean, twin.running_var = False, None, None   # batch statistics, no update
    assert got is not None and got_ln is not None
    torch.testing.assert_close(got, central(twin, x, tangent))
    torch.testing.assert_close(got_ln, central(lambda v: tk.ts_layer_norm(v, w_ln, backend="eager"), x_ln, t_ln))


@pytest.mark.skipif(not FUSED, reason="no fused backend built")
@pytest.mark.parametrize("backend", FUSED)
def test_explicit_fused_backend_under_forward_mode_ad_names_the_problem(backend):
    import torch.autograd.forward_ad as fwAD

    x = make_input((4, 3, 2, 2))
    with fwAD.dual_level():
        with pytest.raises(ValueError, match="forward-mode AD"):
            tk.ts_batch_norm(fwAD.make_dual(x, torch.ones_like(x)), torch.randn(2, 3), backend=backend)
