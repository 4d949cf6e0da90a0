"""Per-task gradients from one backward against T autograd passes and against T single-task backward passes,
on a conv net with TSBatchNorm2d in the replicated batch; the training helper; the loss weightings."""
from __future__ import annotations

import contextlib

import io

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import tsbn_kernels as tk
from tsbn_kernels import mtl

T, N = 3, 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = tk.TSBatchNorm2d(8, T)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=False)
        self.bn2 = tk.TSBatchNorm2d(8, T, activation="relu")
        self.fc = nn.Linear(8, 6)
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(T))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h)).mean(dim=(2, 3))
        return torch.relu(self.fc(h))

    def losses(self, x, targets):
        feats = self.forward(x.repeat(T, 1, 1, 1)).view(T, N, -1)
        return torch.stack([((self.heads[t](feats[t]).squeeze(1) - targets[t]) ** 2).mean() for t in range(T)])


def setup(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = Net().to(dtype)
    x = torch.randn(N, 3, 9, 9, dtype=dtype)
    targets = torch.randn(T, N, dtype=dtype)
    shared = [p for m in (net.conv1, net.conv2, net.fc) for p in m.parameters()]
    return net, x, targets, shared


def single_task_passes(net, x, targets, shared):
    """T separate single-task backward passes, each through a fresh forward."""
    rows = []
    for t in range(T):
        net.zero_grad()
        net.losses(x, targets)[t].backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in shared]))
    net.zero_grad()
    return torch.stack(rows)


@pytest.fixture(params=["per_block_loop", "grouped"])
def conv_split(request, monkeypatch):
    """Both ways OneBackward splits a convolution's weight gradient by block (chosen by the work per block)."""
    from tsbn_kernels.mtl import per_task_grads

    monkeypatch.setattr(per_task_grads, "LOOP_MIN_BLOCK_MACS", 0 if request.param == "per_block_loop" else 1e30)
    return request.param


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_one_backward_equals_autograd_and_single_task_passes(dtype, tol, conv_split):
    net, x, targets, shared = setup(dtype=dtype)
    with mtl.OneBackward(net, T, modules=[net.conv1, net.conv2, net.fc]) as capture:
        losses = net.losses(x, targets)
    assert [id(p) for p in capture.params] == [id(p) for p in shared]
    head_params = list(net.heads.parameters()) + [net.bn1.weight, net.bn2.weight]
    G, head_grads = capture.gradients(losses, head_params)
    G_auto = mtl.autograd_gradients(net.losses(x, targets), shared)
    G_single = single_task_passes(net, x, targets, shared)
    scale = G_single.abs().max().item()
    torch.testing.assert_close(G, G_auto, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(G, G_single, rtol=tol, atol=tol * scale)
    want_heads = torch.autograd.grad(net.losses(x, targets).sum(), head_params)
    for got, want in zip(head_grads, want_heads):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


def test_one_backward_under_autocast(monkeypatch, conv_split):
    """The per-block weight gradients run in the autocast dtype, as the ordinary backward's do (not in float32,
    which would be slower on a GPU and differ from what the T-pass fallback computes)."""
    net, x, targets, shared = setup()
    weight_grad_dtypes = []
    conv2d_weight = torch.nn.grad.conv2d_weight

    def spy(x, shape, dy, **kwargs):
        weight_grad_dtypes.append((x.dtype, dy.dtype))
        return conv2d_weight(x, shape, dy, **kwargs)

    monkeypatch.setattr(torch.nn.grad, "conv2d_weight", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with mtl.OneBackward(net, T, modules=[net.conv1, net.conv2, net.fc]) as capture:
            losses = net.losses(x, targets)
        G, _ = capture.gradients(losses)
        G_auto = mtl.autograd_gradients(net.losses(x, targets), shared)
    assert G.dtype == torch.float32
    calls = 2 * T if conv_split == "per_block_loop" else 2   # two convolutions: T blocks each, or one call each
    assert weight_grad_dtypes == [(torch.bfloat16, torch.bfloat16)] * calls
    relative = (G - G_auto).norm(dim=1) / G_auto.norm(dim=1)
    assert (relative < 1e-2).all(), relative


def test_one_backward_around_a_compiled_model():
    """The recording hooks run outside torch.compile's graph: traced, they would record graph outputs cut off from
    the losses, and every per-task gradient would come out zero."""
    net, x, targets, shared = setup()
    G_auto = mtl.autograd_gradients(net.losses(x, targets), shared)
    compiled = torch.compile(net, backend="aot_eager")
    with mtl.OneBackward(net, T, modules=[net.conv1, net.conv2, net.fc]) as capture:
        feats = compiled(x.repeat(T, 1, 1, 1)).view(T, N, -1)
        losses = torch.stack([((net.heads[t](feats[t]).squeeze(1) - targets[t]) ** 2).mean() for t in range(T)])
    G, _ = capture.gradients(losses)
    torch.testing.assert_close(G, G_auto, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reentrant", [False, True])
def test_one_backward_with_activation_checkpointing(reentrant):
    """Non-reentrant checkpointing keeps the recorded outputs on the autograd path; the reentrant form runs the
    forward without autograd, which OneBackward must refuse by name rather than return zeros."""
    from torch.utils.checkpoint import checkpoint

    net, x, targets, shared = setup()
    G_auto = mtl.autograd_gradients(net.losses(x, targets), shared)

    def losses():
        feats = checkpoint(net, x.repeat(T, 1, 1, 1), use_reentrant=reentrant).view(T, N, -1)
        return torch.stack([((net.heads[t](feats[t]).squeeze(1) - targets[t]) ** 2).mean() for t in range(T)])
    if reentrant:
        with pytest.raises(ValueError, match="use_reentrant=False"), pytest.warns(UserWarning):
            with mtl.OneBackward(net, T, modules=[net.conv1, net.conv2, net.fc]):
                losses()
        return
    with mtl.OneBackward(net, T, modules=[net.conv1, net.conv2, net.fc]) as capture:
        task_losses = losses()
    G, _ = capture.gradients(task_losses)
    torch.testing.assert_close(G, G_auto, rtol=1e-5, atol=1e-6)


def test_one_backward_rejects_non_replicated_layers():
    net, x, targets, _ = setup()
    with pytest.raises(ValueError, match="not divisible into 5 task blocks"):
        with mtl.OneBackward(net, 5, modules=[net.conv1]) as capture:
            out = net(x.repeat(T, 1, 1, 1))
        capture.gradients(out[:5, 0])
    with pytest.raises(ValueError, match="numeric zero padding"):
        mtl.OneBackward(nn.Conv2d(3, 3, 3, padding="same"), 2)


def _block_losses(y, num_tasks=T):
    """Task t's loss from block t of the output alone, each weighted differently so the tasks' gradients differ."""
    return (y.reshape(num_tasks, -1) ** 2).mean(dim=1) * torch.arange(1, num_tasks + 1, dtype=y.dtype)


class TokenNet(nn.Module):
    """Conv stem, task-specific norms, and Linear layers on [B, L, D] tokens and on the flattened [B·L, D] rows."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = tk.TSBatchNorm2d(6, T)
        self.fc_tokens = nn.Linear(6, 5)
        self.ln = tk.TSLayerNorm(5, T)
        self.fc_rows = nn.Linear(5, 4)

    def forward(self, x, task_ids=None):
        h = torch.relu(self.bn(self.conv(x), task_ids))
        tokens = self.ln(self.fc_tokens(h.flatten(2).transpose(1, 2)), task_ids)        # [B, L, 5]
        return self.fc_rows(tokens.reshape(-1, 5)).reshape(x.shape[0], -1)


@pytest.mark.parametrize("pass_ids", ["context", "argument"])
def test_one_backward_with_ragged_per_sample_task_ids(pass_ids):
    """Per-sample task ids (ragged task sizes, tasks interleaved): each layer's weight gradient is split by the ids
    the norms used, for Linear layers on [B, L, D] tokens and on flattened token rows as well as convolutions."""
    torch.manual_seed(5)
    net = TokenNet().double()
    ids = torch.tensor([2, 0, 0, 1, 2, 2, 1, 0, 2, 2, 1])          # sizes 3, 3, 5
    x = torch.randn(len(ids), 3, 4, 5, dtype=torch.float64) * 2 + 1

    def losses(out):
        return torch.stack([(out[ids == t] ** 2).mean() * (t + 1) for t in range(T)])

    def forward():
        if pass_ids == "context":
            with tk.task_ids(ids):
                return net(x)
        return net(x, ids)
    with mtl.OneBackward(net, T) as capture:
        task_losses = losses(forward())

    def no_second_read(*args, **kwargs):
        raise AssertionError("the task sizes were read again: the norms' validation already read them")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "bincount", no_second_read)
        patch.setattr(tk.reference, "samples_per_task", no_second_read)
        G, _ = capture.gradients(task_losses)
    want = mtl.autograd_gradients(losses(forward()), capture.params)
    torch.testing.assert_close(G, want, rtol=1e-10, atol=1e-12)
    assert (G.abs().sum(dim=1) > 0).all()


def test_one_backward_counts_each_layer_and_tied_weight_once():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    net = nn.Sequential(conv, tk.TSBatchNorm2d(3, T), conv, nn.Flatten(2), nn.Unflatten(2, (1, -1)),
                        nn.Flatten(), nn.Unflatten(1, (-1, 3)), a, nn.Tanh(), b).double()
    x = torch.randn(T * N, 3, 3, 3, dtype=torch.float64)
    with mtl.OneBackward(net, T, modules=[conv, conv, a, b]) as capture:
        losses = _block_losses(net(x))
    assert len(capture.params) == len({id(p) for p in capture.params}) == 5   # conv w+b, a w+b, b's bias
    G, _ = capture.gradients(losses)
    torch.testing.assert_close(G, mtl.autograd_gradients(_block_losses(net(x)), capture.params),
                               rtol=1e-10, atol=1e-12)


class StemOnceNet(nn.Module):
    def __init__(self, head_per_task=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = tk.TSBatchNorm2d(4, T)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.heads = nn.ModuleList(nn.Conv2d(4, 1, 1) for _ in range(T))
        self.head_per_task = head_per_task

    def forward(self, x):
        h = self.body(self.bn(self.stem(x if self.head_per_task else x[:N]).repeat(
            1 if self.head_per_task else T, 1, 1, 1)))
        if self.head_per_task:
            h = torch.cat([head(block) for head, block in zip(self.heads, h.chunk(T))])
        return h


def test_one_backward_refuses_what_it_cannot_split_by_task():
    """Layouts where a split by blocks would be silently wrong raise a ValueError naming the layer."""
    x = torch.randn(T * N, 3, 5, 5)
    net = StemOnceNet()       # the stem runs once on N rows (N divisible by T) before the replication
    with mtl.OneBackward(net, T) as capture:
        losses = _block_losses(net(x))
    with pytest.raises(ValueError, match="stem ran on 4 rows, not on the batch of 12 rows"):
        capture.gradients(losses)
    net = StemOnceNet(head_per_task=True)     # captured per-task heads on N rows each
    with mtl.OneBackward(net, T) as capture:
        losses = _block_losses(net(x))
    with pytest.raises(ValueError, match=r"heads\.0 ran on 4 rows"):
        capture.gradients(losses)
    with mtl.OneBackward(net, T, modules=[net.stem, net.body]) as capture:   # heads left out: exact
        losses = _block_losses(net(x))
    G, _ = capture.gradients(losses)
    torch.testing.assert_close(G, mtl.autograd_gradients(_block_losses(net(x)), capture.params))

    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    with mtl.OneBackward(plain, T) as capture:
        losses = _block_losses(plain(x))
    with pytest.raises(ValueError, match=r"1 \(BatchNorm2d\) normalizes with statistics over 12 rows"):
        capture.gradients(losses)
    plain.eval()              # running statistics: per sample, so the split is exact again
    with mtl.OneBackward(plain, T) as capture:
        losses = _block_losses(plain(x))
    G, _ = capture.gradients(losses)
    torch.testing.assert_close(G, mtl.autograd_gradients(_block_losses(plain(x)), capture.params))

    functional = nn.ModuleDict({"body": nn.Linear(8, 8), "proj": nn.Linear(8, 8)})   # proj used outside its forward
    tokens = torch.randn(T * N, 5, 8)
    with mtl.OneBackward(functional, T) as capture:
        losses = _block_losses(F.linear(functional.body(tokens), functional.proj.weight, functional.proj.bias))
    with pytest.raises(ValueError, match="proj's parameters got a gradient but its forward was never called"):
        capture.gradients(losses)
    encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    unused = nn.Linear(8, 8)
    model = nn.ModuleDict({"encoder": encoder, "unused": unused})
    # (Part of the output: the squares of a whole LayerNorm output sum to a constant, so every gradient would be 0.)
    with mtl.OneBackward(model, T, modules=[encoder.linear1, encoder.linear2, unused]) as capture:
        losses = _block_losses(encoder(tokens)[..., :3])
    G, _ = capture.gradients(losses)                # a captured layer the forward never used: zero columns
    want = mtl.autograd_gradients(_block_losses(encoder(tokens)[..., :3]), capture.params)
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(G, want)


@pytest.mark.parametrize("method", ["mean", "pcgrad", "upgrad"])
@pytest.mark.parametrize("one_backward", [True, False])
def test_backward_aggregated_leaves_aggregate_in_grad(method, one_backward):
    net, x, targets, shared = setup(dtype=torch.float64)
    heads = [*net.heads.parameters(), *net.bn1.parameters(), *net.bn2.parameters()]   # task-specific
    G = mtl.autograd_gradients(net.losses(x, targets), shared)
    kwargs = {"generator": torch.Generator().manual_seed(3)} if method == "pcgrad" else {}
    want = mtl.aggregate(G, method, **kwargs)
    net.zero_grad()
    if method == "pcgrad":
        kwargs = {"generator": torch.Generator().manual_seed(3)}
    if one_backward:
        with mtl.OneBackward(net, T, modules=[net.conv1, net.conv2, net.fc]) as capture:
            losses = net.losses(x, targets)
        info = mtl.backward_aggregated(losses, method=method, capture=capture, task_params=heads, **kwargs)
    else:
        info = mtl.backward_aggregated(net.losses(x, targets), shared, method, task_params=heads, **kwargs)
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    assert info["weights"].shape == (T,) and info["gramian"].shape == (T, T)
    for t, head in enumerate(net.heads):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_backward_aggregated_refuses_nan_losses():
    net, x, targets, shared = setup()
    targets[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"task\(s\) \[1\]"):
        mtl.backward_aggregated(net.losses(x, targets), shared, "pcgrad")
    assert all(p.grad is None for p in shared)


def test_loss_weightings():
    uw = mtl.UncertaintyWeighting(3)
    losses = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(uw(losses), losses.sum() / 2)
    dwa = mtl.DynamicWeightAverage(3, temperature=2.0)
    assert torch.equal(dwa.weights(), torch.ones(3))
    dwa.end_epoch(torch.tensor([1.0, 1.0, 1.0]))
    dwa.end_epoch(torch.tensor([0.5, 1.0, 2.0]))
    w = dwa.weights()
    assert abs(w.sum().item() - 3) < 1e-6 and w[2] > w[1] > w[0]
    gn = mtl.GradNorm(2, alpha=1.0, lr=0.1)
    w0 = gn.update(torch.tensor([1.0, 1.0]), torch.tensor([10.0, 1.0]))
    w1 = gn.update(torch.tensor([1.0, 1.0]), torch.tensor([10.0, 1.0]) * w0)
    assert abs(w1.sum().item() - 2) < 1e-6 and w1[0] < 1 < w1[1]   # the large-gradient task is damped


def test_gradnorm_step_is_the_papers_gradient_of_its_loss():
    """One update against autograd on L_grad(w) = Σ_t |w_t·n_t − target_t| (target constant), then Σ w = T,
    fed the weighted norms |∇(w_t·L_t)| that backward_aggregated reports under loss_weights=w."""
    g = torch.Generator().manual_seed(3)
    gn = mtl.GradNorm(3, alpha=1.5, lr=0.05)
    gn.update(torch.tensor([2.0, 1.0, 4.0]), torch.tensor([1.0, 2.0, 3.0]))   # sets L(0), moves w off 1
    w = gn.w.clone().requires_grad_(True)
    norms = torch.rand(3, generator=g) * 5 + 0.5                             # |∇L_t| of this step
    losses = torch.tensor([1.5, 0.9, 1.0])
    rate = losses / torch.tensor([2.0, 1.0, 4.0])
    target = (w.detach() * norms).mean() * (rate / rate.mean()) ** 1.5
    (w * norms - target).abs().sum().backward()
    want = (w.detach() - 0.05 * w.grad).clamp_min(1e-3)
    want = want * 3 / want.sum()
    torch.testing.assert_close(gn.update(losses, w.detach() * norms), want)


@pytest.mark.parametrize("backend", ["eager", "cpu"])
@pytest.mark.parametrize("method", ["upgrad", "aligned_mtl", "nash_mtl", "imtl_g"])
def test_training_step_reads_no_device_data_on_the_host(backend, method, monkeypatch):
    """Forward through fused norms, one backward for the per-task gradients, the Gramian, the weighting and wᵀG into
    .grad (check_finite=False) run no op that reads device data on the host, so on a GPU the step neither
    synchronises nor breaks a CUDA-graph capture (aligned_mtl on its off-CPU eigensolver)."""
    from test_mtl_weightings import HOST_READS
    from torch.utils._python_dispatch import TorchDispatchMode

    from tsbn_kernels.mtl import solvers, weightings

    if backend not in tk.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} not built")
    monkeypatch.setattr(weightings, "_eigh", solvers.symmetric_eigh)

    class RefuseHostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            assert name not in HOST_READS, f"the training step runs {name}, which reads device data on the host"
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), tk.TSBatchNorm2d(8, T, backend=backend, activation="relu"),
                        nn.Conv2d(8, 4, 3))
    x = torch.randn(T * N, 3, 8, 8)
    for refuse in (False, True):    # the first capture of a model checks its split, with host reads, once
        with RefuseHostReads() if refuse else contextlib.nullcontext():
            with mtl.OneBackward(net, T) as capture:
                losses = _block_losses(net(x))
            mtl.backward_aggregated(losses, method=method, capture=capture, check_finite=False)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in capture.params)


def test_backward_aggregated_counts_each_parameter_once():
    """A parameter listed twice is aggregated once (twice, it would get its gradient twice and weigh double in the
    Gramian); one listed as shared and task-specific is refused (it would get both gradients)."""
    net, x, targets, shared = setup(dtype=torch.float64)
    heads = list(net.heads.parameters())
    mtl.backward_aggregated(net.losses(x, targets), shared, "upgrad", task_params=heads)
    want = [p.grad.clone() for p in shared + heads]
    net.zero_grad(set_to_none=True)
    mtl.backward_aggregated(net.losses(x, targets), shared + shared[:2], "upgrad", task_params=heads + heads[:1])
    for p, g in zip(shared + heads, want):
        torch.testing.assert_close(p.grad, g)
    net.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match=r"task_params \[6\] \(by position\) are also shared parameters"):
        mtl.backward_aggregated(net.losses(x, targets), shared, "mean", task_params=heads + [shared[0]])
    with mtl.OneBackward(net, T, modules=[net.conv1, net.conv2, net.fc]) as capture:
        losses = net.losses(x, targets)
    with pytest.raises(ValueError, match="also shared parameters of the OneBackward capture"):
        mtl.backward_aggregated(losses, method="mean", capture=capture, task_params=[net.fc.weight])
    assert all(p.grad is None for p in net.parameters())


def test_loss_weightings_check_the_task_count_and_resume_exactly():
    with pytest.raises(ValueError, match=r"mean_losses must have shape \(3,\)"):
        mtl.DynamicWeightAverage(3).end_epoch(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"losses must have shape \(3,\)"):
        mtl.GradNorm(3).update(torch.tensor([1.0, 2.0]), torch.ones(3))
    with pytest.raises(ValueError, match=r"weighted_grad_norms must have shape \(3,\)"):
        mtl.GradNorm(3).update(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match=r"losses must have shape \(3,\)"):
        mtl.UncertaintyWeighting(3)(torch.ones(3, 1))
    g = torch.Generator().manual_seed(0)
    steps = [(torch.rand(3, generator=g) + 0.5, torch.rand(3, generator=g) + 0.1) for _ in range(6)]
    dwa, gn = mtl.DynamicWeightAverage(3), mtl.GradNorm(3)
    for losses, norms in steps[:3]:
        dwa.end_epoch(losses)
        gn.update(losses, norms)
    dwa2, gn2 = mtl.DynamicWeightAverage(3), mtl.GradNorm(3)
    buffer = io.BytesIO()
    torch.save({"dwa": dwa.state_dict(), "gn": gn.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    dwa2.load_state_dict(state["dwa"])
    gn2.load_state_dict(state["gn"])
    for losses, norms in steps[3:]:
        for a, b in ((dwa, dwa2), (gn, gn2)):
            if isinstance(a, mtl.DynamicWeightAverage):
                a.end_epoch(losses)
                b.end_epoch(losses)
                assert torch.equal(a.weights(), b.weights())
            else:
                assert torch.equal(a.update(losses, norms), b.update(losses, norms))


class ReplicatingNet(nn.Module):
    """A stem and a learned position term run once on the N samples, then mtl.replicate, then task-specific norms."""

    def __init__(self, leak=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.position = nn.Parameter(torch.randn(1, 4, 6, 6))
        self.bn = tk.TSBatchNorm2d(4, T)
        self.body = nn.Conv2d(4, 2, 3, padding=1)
        self.leak = leak

    def forward(self, x):
        replicated = mtl.replicate(self.stem(x) + self.position, T)
        out = self.body(torch.relu(self.bn(replicated)))
        return out + self.position.mean() if self.leak else out     # leak: a use that bypasses the replication


def test_one_backward_splits_what_runs_before_mtl_replicate(conv_split):
    """The stem computed once (DESIGN.md §1) with exact per-task gradients for its layers and for parameters used
    before the replication; a parameter that also reaches the losses another way is refused, not mis-split."""
    torch.manual_seed(2)
    net = ReplicatingNet().double()
    x = torch.randn(N, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(mtl.replicate(x, T), x.repeat(T, 1, 1, 1))
    with mtl.OneBackward(net, T, before_replication=[net.position]) as capture:
        losses = _block_losses(net(x))
    assert [id(p) for p in capture.params] == [id(p) for p in (*net.stem.parameters(), *net.body.parameters(),
                                                                 net.position)]
    G, _ = capture.gradients(losses)
    want = mtl.autograd_gradients(_block_losses(net(x)), capture.params)
    torch.testing.assert_close(G, want, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(G[0], G[1])

    with torch.autocast("cpu", dtype=torch.bfloat16):   # the blocks summed in bf16: the check allows for it
        net32 = ReplicatingNet().float()
        with mtl.OneBackward(net32, T, before_replication=[net32.position]) as capture:
            losses = _block_losses(net32(x.float())).float()
        G, _ = capture.gradients(losses)
        want = mtl.autograd_gradients(_block_losses(net32(x.float())).float(), capture.params)
    assert ((G - want).norm(dim=1) / want.norm(dim=1)).max() < 1e-2

    leaky = ReplicatingNet(leak=True).double()
    with mtl.OneBackward(leaky, T, before_replication=[leaky.position]) as capture:
        losses = _block_losses(leaky(x))
    with pytest.raises(ValueError, match="used before mtl.replicate also reaches the losses another way"):
        capture.gradients(losses)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), tk.TSBatchNorm2d(4, T)).double()
    with mtl.OneBackward(plain, T, before_replication=[net.position]) as capture:
        losses = _block_losses(plain(x.repeat(T, 1, 1, 1)))
    with pytest.raises(ValueError, match="did not replicate the batch with mtl.replicate"):
        capture.gradients(losses)


class RandomLayoutNet(nn.Module):
    """A stem (run once then mtl.replicate, or on the replicated batch), TSσBN, a strided/dilated/grouped conv,
    TSσLN over the tokens, a Linear on [B, L, D] tokens or on their flattened rows."""

    def __init__(self, num_tasks, groups, stride, dilation, stem_once, tokens_3d):
        super().__init__()
        self.num_tasks, self.stem_once, self.tokens_3d = num_tasks, stem_once, tokens_3d
        self.stem = nn.Conv2d(3, 2 * groups, 3, padding=1)
        self.bn = tk.TSBatchNorm2d(2 * groups, num_tasks, activation="relu")
        self.conv = nn.Conv2d(2 * groups, 2 * groups, 3, stride=stride, padding=dilation, dilation=dilation,
                              groups=groups)
        self.ln = tk.TSLayerNorm(2 * groups, num_tasks)
        self.fc = nn.Linear(2 * groups, 3)

    def forward(self, x, ids=None):
        h = self.stem(x)
        if self.stem_once:
            h = mtl.replicate(h, self.num_tasks)
        tokens = self.ln(self.conv(self.bn(h, ids)).flatten(2).transpose(1, 2), ids)
        out = self.fc(tokens if self.tokens_3d else tokens.reshape(-1, tokens.shape[-1]))
        return out.reshape(tokens.shape[0], -1)


@example(1, 2, "stem_once", 1, 1, 1, False, False, 0)   # T = 1: every layer sees N rows; order tells the stem
@given(st.integers(1, 4), st.integers(2, 4), st.sampled_from(["blocks", "stem_once", "ragged"]), st.integers(1, 2),
       st.sampled_from([1, 2]), st.integers(1, 2), st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
def test_property_one_backward_equals_autograd(num_tasks, n, layout, stride, groups, dilation, tokens_3d, loop,
                                                seed):
    """Random layouts (task-major blocks, the stem once, interleaved per-sample ids; T = 1 included) and layer
    shapes: one backward equals T autograd passes over the same parameters in float64."""
    from tsbn_kernels.mtl import per_task_grads

    torch.manual_seed(seed)
    net = RandomLayoutNet(num_tasks, groups, stride, dilation, layout == "stem_once", tokens_3d).double()
    x = torch.randn(n if layout == "stem_once" else num_tasks * n, 3, 5, 6, dtype=torch.float64)
    ids = (torch.arange(num_tasks * n) % num_tasks)[torch.randperm(num_tasks * n)] if layout == "ragged" else None

    def losses(out):
        if ids is None:
            return _block_losses(out, num_tasks)
        return torch.stack([(out[ids == t] ** 2).mean() * (t + 1) for t in range(num_tasks)])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(per_task_grads, "LOOP_MIN_BLOCK_MACS", 0 if loop else 1e30)
        with mtl.OneBackward(net, num_tasks) as capture:
            task_losses = losses(net(x, ids))
        G, _ = capture.gradients(task_losses)
    torch.testing.assert_close(G, mtl.autograd_gradients(losses(net(x, ids)), capture.params), rtol=1e-9,
                               atol=1e-11)


class _InPlaceMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = tk.TSLayerNorm(8, T)
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.ln(x))))     # fc1's recorded output is then changed in place


def _offset_block_losses(y):
    blocks = y.reshape(T, -1)
    return torch.stack([(blocks[t] * (t + 1)).pow(2).mean() + blocks[t].mean() for t in range(T)])


def test_one_backward_exact_when_a_layer_output_is_changed_in_place():
    """nn.ReLU(inplace=True) after a captured layer: the split uses the gradient of the output as the layer made it
    (its autograd edge), not of the tensor the model overwrote (30% off before)."""
    torch.manual_seed(0)
    net = _InPlaceMLP().double()
    x = torch.randn(T * N, 8, dtype=torch.float64)
    with mtl.OneBackward(net, T) as capture:
        losses = _offset_block_losses(net(x))
    G, _ = capture.gradients(losses)
    torch.testing.assert_close(G, mtl.autograd_gradients(_offset_block_losses(net(x)), capture.params))


class _TwoViews(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = tk.TSBatchNorm2d(3, T, gate="none")
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        h = self.bn(x)
        a, b = self.conv(torch.cat([h, h.flip(-1)])).chunk(2)   # 2·batch rows: two task-major halves
        return a * b


def test_one_backward_refuses_rows_of_two_batches_concatenated():
    """A shared layer on torch.cat of two replicated batches has 2·batch rows whose blocks are not whole samples;
    the split used to be silently wrong (rows summed right, each task's row 50–160% off). The first step's check
    against a weighted backward refuses it by name."""
    net = _TwoViews().double()
    x = torch.randn(T * N, 3, 7, 7, dtype=torch.float64)
    with mtl.OneBackward(net, T) as capture:
        losses = _block_losses(net(x))
    with pytest.raises(ValueError, match="per-task gradients of conv do not split by task"):
        capture.gradients(losses)


def test_gradient_matrices_hold_the_widest_parameter_dtype():
    """A float32 layer after a float64 one: G is float64 (it took the first parameter's dtype: float32 rounding of
    the float64 layer's gradients, or float16 of everything)."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 5).float(), nn.Linear(5, 3).double()
    net = nn.Sequential(a, b)
    x = torch.randn(T * N, 4)

    def losses():
        return _block_losses(b(a(x).double()))
    with mtl.OneBackward(net, T) as capture:
        got = losses()
    G, _ = capture.gradients(got)
    want = mtl.autograd_gradients(losses(), capture.params)
    assert G.dtype == want.dtype == torch.float64
    torch.testing.assert_close(G, want)


def _scaled_backward(method, one_backward, scaler, target_scale=1.0):
    """backward_aggregated with ``scaler`` on a fresh net; returns the net, its shared parameters and the info."""
    net, x, targets, shared = setup(seed=5)
    targets = target_scale * targets
    heads = [*net.heads.parameters(), *net.bn1.parameters(), *net.bn2.parameters()]   # task-specific
    kwargs = {"generator": torch.Generator().manual_seed(3)} if method == "pcgrad" else {}
    if one_backward:
        with mtl.OneBackward(net, T, modules=[net.conv1, net.conv2, net.fc]) as capture:
            losses = net.losses(x, targets)
        info = mtl.backward_aggregated(losses, method=method, capture=capture, task_params=heads,
                                       grad_scaler=scaler, **kwargs)
    else:
        info = mtl.backward_aggregated(net.losses(x, targets), shared, method, task_params=heads,
                                       grad_scaler=scaler, **kwargs)
    return net, shared, info


def _scaled_step(method, one_backward, scaler):
    """One SGD step through backward_aggregated with ``scaler``; returns the parameters after it and the info."""
    net, _, info = _scaled_backward(method, one_backward, scaler)
    scaler.step(torch.optim.SGD(net.parameters(), lr=0.1))
    scaler.update()
    return [p.detach().clone() for p in net.parameters()], info


# nash_mtl's direction does not scale with G (α ∝ 1/G): weighting the scaled G would shrink the step by the scale.
@pytest.mark.parametrize("method", ["pcgrad", "nash_mtl", "mgda", "cagrad"])
@pytest.mark.parametrize("one_backward", [True, False])
def test_backward_aggregated_with_a_grad_scaler_takes_the_unscaled_step(method, one_backward):
    plain, plain_info = _scaled_step(method, one_backward, torch.amp.GradScaler("cpu", enabled=False))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaled, info = _scaled_step(method, one_backward, scaler)
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(info["gramian"], plain_info["gramian"], rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(info["losses"], plain_info["losses"])
    assert scaler.get_scale() == 2.0 ** 12          # no overflow: the scale is kept (grows after 2000 good steps)


@pytest.mark.parametrize("method", mtl.METHODS)
@pytest.mark.parametrize("one_backward", [True, False])
def test_backward_aggregated_with_a_grad_scaler_skips_an_overflowed_step(method, one_backward):
    # A scale at which the float32 gradients overflow: no exception from any weighting, a non-finite .grad, and
    # the scaler skips the step (parameters unchanged) and halves the scale.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    before = [p.detach().clone() for p in setup(seed=5)[0].parameters()]
    net, shared, info = _scaled_backward(method, one_backward, scaler, target_scale=100.0)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    assert not all(bool(torch.isfinite(p.grad).all()) for p in shared)
    assert bool(torch.isfinite(info["losses"]).all())
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    assert scaler.get_scale() == 2.0 ** 126
    if one_backward:   # an overflowed step cannot check the split by task: the next one does
        from tsbn_kernels.mtl.per_task_grads import _split_checked

        assert net not in _split_checked


def test_backward_aggregated_gives_every_parameter_a_gradient():
    """task_params=None with a capture: every trainable parameter not split by task gets its plain gradient (as
    from backward()); an explicit list that leaves out one the losses reach (here the task-specific norms'
    weights) is refused by name, and so is a layer OneBackward cannot split in modules= — they used to get no
    gradient and stay as they were, without a word."""
    net, x, targets, shared = setup(seed=1, dtype=torch.float64)
    with mtl.OneBackward(net, T, modules=[net.conv1, net.conv2, net.fc]) as capture:
        losses = net.losses(x, targets)
    mtl.backward_aggregated(losses, method="mean", capture=capture)
    got = {name: p.grad.clone() for name, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    net.losses(x, targets).sum().backward()
    for name, p in net.named_parameters():
        if all(p is not s for s in shared):
            torch.testing.assert_close(got[name], p.grad, msg=name)
    net2, x, targets, _ = setup(seed=2, dtype=torch.float64)       # a model not checked yet
    with mtl.OneBackward(net2, T, modules=[net2.conv1, net2.conv2, net2.fc]) as capture:
        losses = net2.losses(x, targets)
    with pytest.raises(ValueError, match=r"\['bn1.weight', 'bn2.weight'\] reach the losses"):
        mtl.backward_aggregated(losses, method="mean", capture=capture, task_params=list(net2.heads.parameters()))
    with pytest.raises(ValueError, match=r"modules= holds \['ConvTranspose2d'\]"):
        mtl.OneBackward(net2, T, modules=[net2.conv1, nn.ConvTranspose2d(8, 8, 2)])


class NetWithAnUnusedBranch(Net):
    def __init__(self):
        super().__init__()
        self.aux = nn.Linear(6, 4)

    def forward(self, x):
        out = super().forward(x)
        self.aux(out.detach())          # runs on the replicated batch, feeds no loss
        return out


@pytest.mark.parametrize("one_backward", [True, False])
def test_a_shared_layer_no_loss_reaches_keeps_no_grad(one_backward):
    """As after backward(): a shared layer whose output feeds no loss keeps .grad None, not zeros (with zeros,
    weight decay and momentum would still move it)."""
    torch.manual_seed(0)
    net = NetWithAnUnusedBranch().double()
    x, targets = torch.randn(N, 3, 9, 9, dtype=torch.float64), torch.randn(T, N, dtype=torch.float64)
    shared = [p for m in (net.conv1, net.conv2, net.fc, net.aux) for p in m.parameters()]
    if one_backward:
        with mtl.OneBackward(net, T, modules=[net.conv1, net.conv2, net.fc, net.aux]) as capture:
            losses = net.losses(x, targets)
        mtl.backward_aggregated(losses, method="upgrad", capture=capture)
    else:
        mtl.backward_aggregated(net.losses(x, targets), shared, "upgrad",
                                task_params=[*net.heads.parameters(), *net.bn1.parameters(), *net.bn2.parameters()])
    assert net.aux.weight.grad is None and net.aux.bias.grad is None
    assert all(p.grad is not None for p in shared[:-2])


class _LayerScaleNet(Net):
    """Net with a raw shared parameter after the task-specific norm (a layer scale), which OneBackward cannot
    split: by default it lands among the task_params and would get the plain sum of the tasks' gradients."""

    def __init__(self):
        super().__init__()
        self.layer_scale = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x))) * self.layer_scale.view(1, -1, 1, 1)
        h = self.bn2(self.conv2(h)).mean(dim=(2, 3))
        return torch.relu(self.fc(h))


def test_a_shared_raw_parameter_among_the_default_task_params_is_named(recwarn):
    torch.manual_seed(0)
    x, targets = torch.randn(N, 3, 9, 9), torch.randn(T, N)
    net = Net()                    # heads and norms only: each element is one task's, nothing to say
    for _ in range(2):
        with mtl.OneBackward(net, T, modules=[net.conv1, net.conv2, net.fc]) as capture:
            losses = net.losses(x, targets)
        mtl.backward_aggregated(losses, method="upgrad", capture=capture)
    assert not [w for w in recwarn if "several tasks" in str(w.message)]

    net = _LayerScaleNet()
    with mtl.OneBackward(net, T, modules=[net.conv1, net.conv2, net.fc]) as capture:
        losses = net.losses(x, targets)
    with pytest.warns(UserWarning, match=r"layer_scale get gradients from several tasks' losses but are not among"):
        mtl.backward_aggregated(losses, method="upgrad", capture=capture)
    assert net.layer_scale.grad is not None
    recwarn.clear()
    with mtl.OneBackward(net, T, modules=[net.conv1, net.conv2, net.fc]) as capture:       # once per model
        losses = net.losses(x, targets)
    mtl.backward_aggregated(losses, method="upgrad", capture=capture)
    net = _LayerScaleNet()                          # an explicit task_params list is the user's choice
    with mtl.OneBackward(net, T, modules=[net.conv1, net.conv2, net.fc]) as capture:
        losses = net.losses(x, targets)
    task_params = [p for n, p in net.named_parameters() if n.startswith(("heads", "bn", "layer"))]
    mtl.backward_aggregated(losses, method="upgrad", capture=capture, task_params=task_params)
    assert not [w for w in recwarn if "several tasks" in str(w.message)]


def test_a_parameter_outside_the_model_that_reaches_the_losses_is_refused():
    """backward() would train it; backward_aggregated's step gave it no gradient, silently: heads kept outside the
    captured model, or the log-variances of a learned loss weighting multiplied into the losses."""
    torch.manual_seed(0)
    x, targets = torch.randn(N, 3, 9, 9), torch.randn(T, N)
    net = Net()
    body = nn.ModuleDict({"conv1": net.conv1, "bn1": net.bn1, "conv2": net.conv2, "bn2": net.bn2, "fc": net.fc})
    log_var = nn.Parameter(torch.zeros(T))
    with mtl.OneBackward(body, T) as capture:
        losses = net.losses(x, targets) * log_var.exp()
    # the 3 heads' weights and biases, and log_var
    with pytest.raises(ValueError, match=r"7 parameter\(s\) outside the captured model reach the losses"):
        mtl.backward_aggregated(losses, method="upgrad", capture=capture)
    with mtl.OneBackward(body, T) as capture:
        losses = net.losses(x, targets) * log_var.exp()
    task = [*net.heads.parameters(), *net.bn1.parameters(), *net.bn2.parameters(), log_var]
    mtl.backward_aggregated(losses, method="upgrad", capture=capture, task_params=task)
    assert all(p.grad is not None for p in task)


class _NormLast(nn.Module):
    """conv → task-specific norm: the sum of each task's block of the output is its bias times the count, a
    constant, so the gradient of such a loss is rounding; ``mix`` then adds a layer that mixes samples of
    different tasks."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = tk.TSBatchNorm2d(8, T, bias=True)
        self.mix = False

    def forward(self, x):
        y = self.norm(self.conv(x))
        return y + 0.5 * y.roll(1, 0) if self.mix else y


def test_a_loss_constant_up_to_rounding_is_no_split_error_and_the_next_step_is_checked():
    """`loss = out.sum()` after a norm, the usual first try: every gradient is rounding, which differs between any
    two ways of computing it by its own size; the split check took that for samples mixed across tasks. It now
    measures the rounding floor and checks the next step instead."""
    torch.manual_seed(0)
    net = _NormLast()
    with torch.no_grad():
        net.norm.bias.normal_()
    x = torch.randn(T * N, 3, 8, 8)
    with mtl.OneBackward(net, T) as capture:
        losses = net(x).reshape(T, -1).sum(dim=1)
    G, _ = capture.gradients(losses)
    assert float(G.norm()) < 1e-3 * float(losses.detach().abs().max())
    net.mix = True                                   # the next step's gradients are real: its mixing is caught
    with mtl.OneBackward(net, T) as capture:
        losses = _block_losses(net(x))
    with pytest.raises(ValueError, match="per-task gradients of conv do not split by task"):
        capture.gradients(losses)


class DeepNet(nn.Module):
    """Eight 3×3 convolutions with task-specific norms at full resolution: activations (and their gradients) far
    outweigh the weights, as in the dense-prediction models."""

    def __init__(self, layers=8, width=8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(layers))
        self.norms = nn.ModuleList(tk.TSBatchNorm2d(width, T, activation="relu") for _ in range(layers))

    def forward(self, x):
        h = self.stem(x)
        for conv, norm in zip(self.convs, self.norms):
            h = norm(conv(h))
        return h.mean(dim=(1, 2, 3)).view(T, -1).mean(dim=1)


def test_one_backward_frees_each_layer_output_gradient_as_an_ordinary_backward_does():
    """The per-task split of a layer's output gradient happens as the backward reaches the layer, so its memory
    peak stays that of one ordinary backward plus G (it held every layer's output gradient to the end before)."""
    from tsbn_kernels.pipeline.memory import PeakMemory

    torch.manual_seed(0)
    net = DeepNet().double()
    x = torch.randn(T * 2, 3, 32, 32, dtype=torch.float64)
    shared = [p for name, p in net.named_parameters() if not name.startswith("norms")]
    outputs = 2 * T * 8 * 32 * 32 * 8                       # bytes of one layer's output (and of its gradient)
    G_bytes = T * sum(p.numel() for p in shared) * 8
    for step in range(2):          # the first call also runs the split check (one more backward, graph retained)
        with mtl.OneBackward(net, T, modules=[net.stem, *net.convs]) as capture:
            losses = net(x)
        with PeakMemory("cpu") as one:
            G, _ = capture.gradients(losses)
    ordinary_losses = net(x)
    with PeakMemory("cpu") as ordinary:
        torch.autograd.grad(ordinary_losses.sum(), shared)
    torch.testing.assert_close(G.sum(0), torch.cat([g.reshape(-1) for g in
                                                    torch.autograd.grad(net(x).sum(), shared)]))
    # Held to the end, the nine output gradients alone would be 9 · outputs above the ordinary backward.
    assert one.peak_bytes <= ordinary.peak_bytes + G_bytes + 2 * outputs, (one.peak_bytes, ordinary.peak_bytes)
