"""Per-sample task ids beyond the basic checks: one host sync per ids tensor, torch.compile(fullgraph=True), meta
tensors, and the empty batch, on every backend available here."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tsbn_kernels as tk
from conftest import make_input
from tsbn_kernels import validation

BACKENDS = tk.available_backends("cpu")


def three_layer_net(backend: str, num_tasks: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), tk.TSBatchNorm2d(4, num_tasks, backend=backend), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), tk.TSBatchNorm2d(4, num_tasks, backend=backend),
                         nn.Conv2d(4, 4, 1), tk.TSBatchNorm2d(4, num_tasks, backend=backend))


@pytest.fixture
def counted_task_counts(monkeypatch):
    calls = []
    real = validation.task_counts

    def counting(ids, num_tasks):
        calls.append(ids)
        return real(ids, num_tasks)

    monkeypatch.setattr(validation, "task_counts", counting)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_host_check_per_ids_tensor_per_forward(backend, counted_task_counts):
    net = three_layer_net(backend)
    x = make_input((7, 3, 5, 5))
    ids = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    with tk.task_ids(ids):
        net(x).sum().backward()
    assert len(counted_task_counts) == 1
    with tk.task_ids(ids):
        net(x)
    assert len(counted_task_counts) == 1  # the same unchanged tensor: still known good
    with tk.task_ids(ids.clone()):
        net(x)
    assert len(counted_task_counts) == 2  # another tensor is checked again


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_changed_in_place_are_checked_again(backend):
    net = three_layer_net(backend)
    x = make_input((6, 3, 4, 4))
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    with tk.task_ids(ids):
        net(x)
    ids[3] = 3
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 3\)"), tk.task_ids(ids):
        net(x)
    ids.copy_(torch.tensor([0, 1, 0, 0, 1, 0]))  # task 2 absent now: stale counts would advance its count
    with tk.task_ids(ids):
        net(x)
    assert net[1].num_batches_tracked.tolist() == [2, 2, 1]


def test_cached_counts_are_per_num_tasks():
    x = make_input((4, 2, 3, 3))
    ids = torch.tensor([0, 1, 2, 2])
    tk.ts_batch_norm(x, torch.randn(3, 2), task_ids=ids)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\)"):
        tk.ts_batch_norm(x, torch.randn(2, 2), task_ids=ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_with_per_sample_task_ids(backend):
    net = three_layer_net(backend)
    twin = three_layer_net("eager")
    twin.load_state_dict(net.state_dict())
    x = make_input((7, 3, 5, 5), offset=1.0)
    ids = torch.tensor([2, 0, 1, 1, 0, 2, 2])

    def step(model, x, ids):
        with tk.task_ids(ids):
            return model(x)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    y = compiled(net, x, ids)
    y.square().sum().backward()
    want = step(twin, x, ids)
    want.square().sum().backward()
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(net[0].weight.grad, twin[0].weight.grad, rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(net.modules(), twin.modules()):
        if isinstance(ours, tk.TSBatchNorm2d):
            torch.testing.assert_close(ours.running_mean, theirs.running_mean)
            assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)


@pytest.mark.parametrize("bad,message", [(torch.tensor([0, 1, 3, 0, 1, 2]), r"task_ids must lie in \[0, 3\)"),
                                         (torch.tensor([0, 1, 2, 0, 1, 0]), "more than 1 value per channel")])
def test_compiled_graph_asserts_what_it_cannot_check_on_the_host(bad, message):
    bn = tk.TSBatchNorm1d(4, 3)
    compiled = torch.compile(lambda x, ids: bn(x, ids), fullgraph=True)
    compiled(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    with pytest.raises(RuntimeError, match=message):
        compiled(torch.randn(6, 4), bad)


def test_meta_tensors_give_shapes():
    bn = tk.TSBatchNorm2d(8, 3, device="meta")
    x = torch.empty(6, 8, 4, 4, device="meta")
    assert bn(x).shape == x.shape
    assert bn(x, torch.empty(6, dtype=torch.long, device="meta")).shape == x.shape
    ln = tk.TSLayerNorm(16, 3, device="meta")
    assert ln(torch.empty(6, 5, 16, device="meta")).shape == (6, 5, 16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_empty_batch_in_training_is_a_no_op_like_batch_norm(backend, per_sample):
    bn = tk.TSBatchNorm2d(4, 2, momentum=None, backend=backend)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    y = bn(x, torch.zeros(0, dtype=torch.long) if per_sample else None)
    y.sum().backward()
    assert y.shape == x.shape
    for name, value in bn.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert torch.equal(bn.weight.grad, torch.zeros_like(bn.weight))
