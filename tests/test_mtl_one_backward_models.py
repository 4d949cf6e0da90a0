"""OneBackward and backward_aggregated on the architectures researchers build (tiny shapes, float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tsbn_kernels as tk
from tsbn_kernels import mtl

T, N = 3, 2


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _block_losses(y):
    rows = y.shape[0] // T
    return torch.stack([(y[t * rows:(t + 1) * rows] * (t + 1)).sin().sum() for t in range(T)])


class _MixingNet(nn.Module):
    """A shared conv on torch.cat of two replicated batches (its split is wrong) under a linear head."""

    def __init__(self):
        super().__init__()
        self.bn = tk.TSBatchNorm2d(3, T, gate="none")
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        a, b = self.conv(torch.cat([self.bn(x), x.flip(-1)])).chunk(2)
        return self.head((a * b).mean((2, 3)))


def test_split_check_is_not_spent_on_a_step_without_gradients():
    """A zero-initialised head makes every per-task gradient of the first step exactly 0: the once-per-model split
    check compared nothing, yet marked the model checked, so the mixing it exists to catch went unnoticed ever
    after. It now waits for a step with gradients."""
    net = _MixingNet()
    nn.init.zeros_(net.head.weight)
    x = torch.randn(T * N, 3, 6, 6)
    with mtl.OneBackward(net, T, modules=[net.conv]) as capture:
        losses = _block_losses(net(x))
    G, _ = capture.gradients(losses, list(net.head.parameters()))
    assert not G.any()
    nn.init.normal_(net.head.weight)
    with mtl.OneBackward(net, T, modules=[net.conv]) as capture:
        losses = _block_losses(net(x))
    with pytest.raises(ValueError, match="per-task gradients of conv do not split by task"):
        capture.gradients(losses, list(net.head.parameters()))


class _PosTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.pos = nn.Parameter(torch.randn(1, 4, 1, 1))
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        h = mtl.replicate(self.stem(x) + self.pos, T)
        return F.relu(self.bn(self.conv(h))) * self.pos.sigmoid()


def test_refusal_of_a_parameter_used_before_and_after_replicate_names_it():
    net = tk.convert_batchnorm(_PosTwice(), T)
    with mtl.OneBackward(net, T, before_replication=[net.pos]) as capture:
        losses = _block_losses(net(torch.randn(N, 3, 5, 5)))
    with pytest.raises(ValueError, match=r"reaches the losses another way \(pos, shape"):
        capture.gradients(losses, [net.bn.weight])


class _Teacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.teacher = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        with torch.no_grad():
            target = self.teacher(x)
        return self.bn(self.conv(x)) - target


def test_refusal_of_a_layer_run_under_no_grad_says_how_to_leave_it_out():
    net = tk.convert_batchnorm(_Teacher(), T)
    with pytest.raises(ValueError, match=r"output of teacher does not require grad.*leave it out of `modules=`"):
        with mtl.OneBackward(net, T):
            net(torch.randn(T * N, 3, 5, 5))
    with mtl.OneBackward(net, T, modules=[net.conv]) as capture:
        losses = _block_losses(net(torch.randn(T * N, 3, 5, 5)))
    capture.gradients(losses, [net.bn.weight])
