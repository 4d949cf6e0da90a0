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


class _Bottleneck(nn.Module):
    def __init__(self, cin, width, stride=1, dilation=1, groups=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, dilation, dilation, groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(nn.Conv2d(cin, 4 * width, 1, stride, bias=False), nn.BatchNorm2d(4 * width))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self.downsample(x)
        return self.relu(out)


class _ResNet(nn.Module):
    """torchvision's layout: stem, bottlenecks with a downsample branch, a dilated stage, per-task heads."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 7, 2, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        self.layer1 = _Bottleneck(4, 2)
        self.layer2 = _Bottleneck(8, 2, stride=2, groups=2)
        self.layer3 = _Bottleneck(8, 2, dilation=2)
        self.heads = nn.ModuleList(nn.Conv2d(8, 2, 1) for _ in range(T))

    def forward(self, x):
        h = self.layer3(self.layer2(self.layer1(self.stem(x))))
        rows = h.shape[0] // T
        return torch.stack([self.heads[t](h[t * rows:(t + 1) * rows]).sin().sum() for t in range(T)])

    def shared(self):
        return [m for name, m in self.named_modules() if isinstance(m, nn.Conv2d) and not name.startswith("heads")]


class _MobileNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU6(inplace=True),
            nn.Conv2d(4, 4, 3, 1, 1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU6(inplace=True),
            nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
            nn.Conv2d(8, 8, 3, 2, 1, groups=8, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return _block_losses(self.fc(self.features(x).mean((2, 3))))


class _UNet(nn.Module):
    def __init__(self):
        super().__init__()
        def block(cin, cout, stride=1):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.e1, self.e2, self.e3 = block(3, 4), block(4, 6, 2), block(6, 6, 2)
        self.d2, self.d1 = block(12, 6), block(10, 4)
        self.out = nn.Conv2d(4, 2, 1)

    def features(self, x):
        a = self.e1(x)
        b = self.e2(a)
        u = F.interpolate(self.e3(b), scale_factor=2, mode="bilinear", align_corners=False)
        d = self.d2(torch.cat([u, b], 1))
        return self.out(self.d1(torch.cat([F.interpolate(d, size=a.shape[-2:]), a], 1)))

    def forward(self, x):
        return _block_losses(self.features(x))


class _Conv1d3d(nn.Module):
    def __init__(self, dim):
        super().__init__()
        conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dim == 1 else (nn.Conv3d, nn.BatchNorm3d)
        self.c1, self.b1 = conv(2, 4, 3, 2, 1), bn(4)
        self.c2, self.b2 = conv(4, 4, 3, 1, 2, dilation=2, groups=2), bn(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        return _block_losses(self.fc(h.flatten(2).mean(-1)))


class _ViT(nn.Module):
    """Patch embedding, class token and position embedding run once, then mtl.replicate; TSσLN on [B, L, D]."""

    def __init__(self, D=8):
        super().__init__()
        self.patch = nn.Conv2d(3, D, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, D))
        self.pos = nn.Parameter(torch.randn(1, 5, D))
        self.ln1, self.qkv, self.proj = nn.LayerNorm(D), nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.heads = nn.ModuleList(nn.Linear(D, 2) for _ in range(T))

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = mtl.replicate(torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos, T)
        B, L, D = h.shape
        q, k, v = self.qkv(self.ln1(h)).reshape(B, L, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        rows = B // T
        return torch.stack([self.heads[t](h[t * rows:(t + 1) * rows, 0]).pow(2).sum() for t in range(T)])

    def shared(self):
        return [m for name, m in self.named_modules()
                if isinstance(m, (nn.Conv2d, nn.Linear)) and not name.startswith("heads")]


def _model(kind):
    if kind == "vit":
        return tk.convert_layernorm(_ViT(), T), torch.randn(N, 3, 8, 8)
    net, shape = {"resnet": (_ResNet, (3, 32, 32)), "mobilenet": (_MobileNet, (3, 12, 12)), "unet": (_UNet, (3, 8, 8)),
                  "conv1d": (lambda: _Conv1d3d(1), (2, 12)), "conv3d": (lambda: _Conv1d3d(3), (2, 4, 6, 6))}[kind]
    return tk.convert_batchnorm(net(), T), torch.randn(T * N, *shape)


@pytest.mark.parametrize("kind, channels_last", [(kind, False) for kind in ("resnet", "mobilenet", "unet", "conv1d",
                                                                           "conv3d", "vit")]
                         + [(kind, True) for kind in ("resnet", "mobilenet", "unet")])
def test_one_backward_and_backward_aggregated_match_autograd(kind, channels_last):
    torch.manual_seed(0)
    net, x = _model(kind)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    modules = net.shared() if hasattr(net, "shared") else None
    before = [net.cls, net.pos] if kind == "vit" else []
    with mtl.OneBackward(net, T, modules=modules, before_replication=before) as capture:
        losses = net(x)
    G, _ = capture.gradients(losses)
    shared = capture.params
    rest = [p for p in net.parameters() if all(p is not q for q in shared)]
    losses = net(x)
    G_ref = mtl.autograd_gradients(losses, shared)
    rest_ref = torch.autograd.grad(losses.sum(), rest)
    torch.testing.assert_close(G, G_ref, rtol=1e-10, atol=1e-12)
    with mtl.OneBackward(net, T, modules=modules, before_replication=before) as capture:
        losses = net(x)
    mtl.backward_aggregated(losses, method="upgrad", capture=capture)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), mtl.aggregate(G_ref, "upgrad"),
                               rtol=1e-8, atol=1e-10)
    for p, g in zip(rest, rest_ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_ragged_task_ids_through_a_unet():
    torch.manual_seed(0)
    net, _ = _model("unet")
    ids = torch.tensor([2, 0, 0, 1, 2, 2, 2])
    x = torch.randn(len(ids), 3, 8, 8)

    def losses_of(net):
        with tk.task_ids(ids):
            y = net.features(x)
        return torch.stack([(y[ids == t] * (t + 1)).sin().sum() for t in range(T)])

    with mtl.OneBackward(net, T) as capture:
        losses = losses_of(net)
    G, _ = capture.gradients(losses)
    torch.testing.assert_close(G, mtl.autograd_gradients(losses_of(net), capture.params), rtol=1e-10, atol=1e-12)
