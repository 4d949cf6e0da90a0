"""OneBackward and backward_aggregated on the architectures researchers build (tiny shapes, float64)."""
from __future__ import annotations

import pytest
import torch
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
