"""The fused training step on the device it runs on: per-task gradients from one backward through the fused TS
norm kernels (cuda and triton on a GPU; cpu, and triton under TRITON_INTERPRET=1, here), NCHW and channels_last,
float32 and bfloat16 autocast, and the aggregate left in .grad, against a float64 CPU ground truth of T
single-task backward passes through the eager reference norms. tests/test_mtl_per_task.py covers the capture's
logic on the CPU; this file is what gpu_check.sh runs to verify the same step on a GPU."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tsbn_kernels as tk
from tsbn_kernels import mtl

T, N = 3, 4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in tk.available_backends(DEVICE) if b != "eager"]
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no fused norm backend on this device")


class Net(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = tk.TSBatchNorm2d(8, T, backend=backend, bias=True)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = tk.TSBatchNorm2d(16, T, backend=backend, activation="relu")
        self.fc = nn.Linear(16, 6)
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(T))

    def losses(self, x, targets):
        h = torch.relu(self.bn1(self.conv1(x.repeat(T, 1, 1, 1))))
        feats = torch.relu(self.fc(self.bn2(self.conv2(h)).mean(dim=(2, 3)))).view(T, x.shape[0], -1)
        return torch.stack([((self.heads[t](feats[t]).squeeze(1) - targets[t]) ** 2).mean()
                            for t in range(T)])

    def shared(self):
        return [p for m in (self.conv1, self.conv2, self.fc) for p in m.parameters()]


def make(seed=0):
    torch.manual_seed(seed)
    net = Net("eager")
    with torch.no_grad():                       # task-distinct gates and shifts: a task mix-up shows
        for bn in (net.bn1, net.bn2):
            bn.weight.normal_()
            if bn.bias is not None:
                bn.bias.normal_()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(N, 3, 10, 9, generator=g) * 2 + 3          # |mean| > std, odd spatial size
    targets = torch.randn(T, N, generator=g)
    return net, x, targets


def truth(net, x, targets):
    """G [T, P] of T single-task backward passes, float64, on the CPU, through the eager reference."""
    net = copy.deepcopy(net).double()
    rows = []
    for t in range(T):
        net.zero_grad()
        net.losses(x.double(), targets.double())[t].backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in net.shared()]))
    return torch.stack(rows)


def on_device(net, backend, channels_last):
    net = copy.deepcopy(net).to(DEVICE)
    for bn in (net.bn1, net.bn2):
        bn.backend = backend
    return net.to(memory_format=torch.channels_last) if channels_last else net


def prepare(x, channels_last):
    x = x.to(DEVICE)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_one_backward_through_fused_norms_equals_single_task_passes(backend, channels_last, amp):
    net, x, targets = make()
    want = truth(net, x, targets)
    model = on_device(net, backend, channels_last)
    with torch.autocast(DEVICE, dtype=amp or torch.float32, enabled=amp is not None):
        with mtl.OneBackward(model, T, modules=[model.conv1, model.conv2, model.fc]) as capture:
            losses = model.losses(prepare(x, channels_last), targets.to(DEVICE))
        G, _ = capture.gradients(losses)
    assert G.device.type == DEVICE and G.dtype == torch.float32
    G = G.double().cpu()
    if amp is None:
        torch.testing.assert_close(G, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    else:
        # bfloat16 alone moves these gradients by several percent from the float64 truth, differently for each
        # norm kernel's rounding (eager's loop too), so the tight check is against the T-pass loop through the
        # same kernels under the same autocast, and the truth bounds both loosely.
        same = on_device(net, backend, channels_last)
        with torch.autocast(DEVICE, dtype=amp):
            loop = mtl.autograd_gradients(same.losses(prepare(x, channels_last), targets.to(DEVICE)),
                                          same.shared()).double().cpu()
        relative = (G - loop).norm(dim=1) / loop.norm(dim=1)
        assert (relative < 1e-3).all(), relative
        for got in (G, loop):
            assert ((got - want).norm(dim=1) / want.norm(dim=1) < 0.15).all()
    assert want.norm(dim=1).min() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["mean", "upgrad", "mgda", "dualproj", "cagrad", "imtl_g", "aligned_mtl",
                                    "nash_mtl"])
def test_backward_aggregated_on_device_leaves_the_aggregate_in_grad(backend, method):
    net, x, targets = make(seed=4)
    want = mtl.aggregate(truth(net, x, targets), method)
    model = on_device(net, backend, channels_last=True)
    with mtl.OneBackward(model, T, modules=[model.conv1, model.conv2, model.fc]) as capture:
        losses = model.losses(prepare(x, True), targets.to(DEVICE))
    info = mtl.backward_aggregated(losses, method=method, capture=capture)
    got = torch.cat([p.grad.reshape(-1) for p in model.shared()]).double().cpu()
    assert info["weights"].device.type == DEVICE
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * want.abs().max().item())
    for head in model.heads:                     # task parameters get their ordinary gradient
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert model.bn1.weight.grad is not None and model.bn1.weight.grad.abs().sum() > 0
