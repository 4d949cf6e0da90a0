"""A user adopting the package in an existing multi-task model: regressions found by exercising conversion,
checkpoints, per-sample task ids and the layers on every backend, each checked against tsbn_kernels.reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tsbn_kernels as tk
from conftest import make_input, tolerance
from tsbn_kernels import reference

BACKENDS = tk.available_backends("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_buffer_refilled_through_numpy_is_checked_again(backend):
    # A loader that refills one numpy buffer per batch, shared with a tensor by torch.from_numpy: the writes do not
    # bump the tensor's version, so the checked-ids cache must not trust the last batch's counts.
    torch.manual_seed(0)
    bn = tk.TSBatchNorm1d(3, 3, backend=backend, track_running_stats=False)
    buffer = np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)
    ids = torch.from_numpy(buffer)
    bn(make_input((6, 3), offset=10.0), task_ids=ids)
    buffer[2] = 7                                    # out of range now: must not reach the kernel
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 3\)"):
        bn(make_input((6, 3)), task_ids=ids)
    buffer[:] = [0, 0, 1, 1, 1, 0]                   # valid, task 2 absent: must not be refused with stale counts
    x = make_input((6, 3), offset=10.0)
    want = reference.ts_batch_norm(x, bn.weight, None, task_ids=ids, num_tasks=3)
    torch.testing.assert_close(bn(x, task_ids=ids), want, **tolerance(torch.float32))
    buffer[:] = [0, 1, 1, 1, 2, 2]                   # task 0 has a single value per channel now
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(x, task_ids=ids)


def _trained_bn(cls=nn.BatchNorm2d, shape=(8, 3, 4, 4), **kwargs) -> nn.Module:
    bn = cls(shape[1], **kwargs)
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    bn.train()
    for _ in range(3):
        bn(make_input(shape, offset=5.0, scale=2.0))
    return bn


@pytest.mark.parametrize("backend", BACKENDS)
def test_converted_bn_whose_track_running_stats_was_switched_off_keeps_its_function(backend):
    # nn.BatchNorm with track_running_stats set to False after construction still normalises with its running
    # statistics in eval (it only stops updating them): the converted layer must keep them and do the same.
    bn = _trained_bn()
    bn.track_running_stats = False
    ts = tk.convert_batchnorm(_copy(bn), 2, gate="none", backend=backend)
    x = make_input((4, 3, 4, 4), offset=5.0, scale=2.0)
    for training in (False, True):
        bn.train(training)
        ts.train(training)
        before = ts.running_mean.clone()
        torch.testing.assert_close(ts(x.repeat(2, 1, 1, 1)), bn(x).repeat(2, 1, 1, 1), **tolerance(torch.float32))
        assert torch.equal(ts.running_mean, before)   # not updated in training, as the original


@pytest.mark.parametrize("backend", BACKENDS)
def test_converted_bn_without_running_buffers_uses_batch_statistics_in_eval(backend):
    bn = _trained_bn(nn.BatchNorm1d, (8, 3))
    bn.running_mean = bn.running_var = None   # the nn idiom for batch statistics in eval
    bn.eval()
    ts = tk.convert_batchnorm(_copy(bn), 2, gate="none", backend=backend)
    assert ts.running_mean is None
    x = make_input((6, 3), offset=5.0, scale=2.0)
    torch.testing.assert_close(ts(x.repeat(2, 1)), bn(x).repeat(2, 1), **tolerance(torch.float32))
    ts.reset_running_stats()   # nothing to reset; must not fail


def test_convert_on_the_meta_device_then_materialise():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 4),
                              nn.BatchNorm1d(4, momentum=None))
    tk.convert_batchnorm(model, 3)
    assert model[1].running_mean.device.type == "meta" and model[4].num_batches_tracked.shape == (3,)
    model.to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    x = make_input((6, 3, 2, 2), offset=3.0)
    y = model(x)
    bn = model[1]
    h = model[0](x)
    assert bn.num_batches_tracked.tolist() == [1, 1, 1]
    assert torch.isfinite(y).all()
    torch.testing.assert_close(bn.running_mean, reference_running_mean(h, 3, 0.1), **tolerance(torch.float32))


def reference_running_mean(h: torch.Tensor, num_tasks: int, momentum: float) -> torch.Tensor:
    rm = torch.zeros(num_tasks, h.shape[1])
    rv = torch.ones(num_tasks, h.shape[1])
    reference.ts_batch_norm(h.detach(), None, None, rm, rv, num_tasks=num_tasks, momentum=momentum)
    return rm


@pytest.mark.parametrize("backend", BACKENDS)
def test_converted_half_bn_keeps_float32_statistics(backend):
    bn = _trained_bn()
    bn.half()
    bn.running_mean, bn.running_var = bn.running_mean.float(), bn.running_var.float()
    ts = tk.convert_batchnorm(_copy(bn), 2, gate="none", backend=backend)
    assert ts.weight.dtype == torch.float16 and ts.running_var.dtype == torch.float32
    torch.testing.assert_close(ts.running_var[1], bn.running_var, rtol=0, atol=0)
    x = make_input((4, 3, 4, 4), torch.float16, offset=5.0, scale=2.0)
    rm, rv = ts.running_mean.clone(), ts.running_var.clone()
    want = reference.ts_batch_norm(x, ts.weight, ts.bias, rm, rv, num_tasks=2, gate="none")
    torch.testing.assert_close(ts(x), want, **tolerance(torch.float16))
    torch.testing.assert_close(ts.running_mean, rm, **tolerance(torch.float32))
    torch.testing.assert_close(ts.running_var, rv, **tolerance(torch.float32))


def test_convert_layernorm_without_affine_and_gate_init_copy_keeps_the_function():
    ln = nn.LayerNorm(8, elementwise_affine=False)
    ts = tk.convert_layernorm(nn.Sequential(ln), 2, gate="sigmoid", gate_init="copy")[0]
    x = make_input((4, 5, 8), offset=3.0)
    # γ = 1 becomes logit(1 − 1e-3): the gate is 0.999, as for a copied γ ≥ 1.
    torch.testing.assert_close(ts(x.repeat(2, 1, 1)), 0.999 * ln(x).repeat(2, 1, 1), rtol=1e-4, atol=1e-4)


def _copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


class _Block(nn.Module):
    def __init__(self, num_tasks: int, backend: str):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.ln = tk.TSLayerNorm(8, num_tasks, gate="none", bias=True, backend=backend)
        self.lin2 = nn.Linear(8, 8)
        self.bn = tk.TSBatchNorm1d(8, num_tasks, backend=backend)   # on [B, C, L]: the sequence as L
        with torch.no_grad():
            self.ln.weight.normal_()
            self.ln.bias.normal_()

    def forward(self, x):
        h = self.ln(self.lin(x)).relu()
        return self.bn(self.lin2(h).transpose(1, 2)).transpose(1, 2)


class _Checkpointed(nn.Module):
    def __init__(self, num_tasks: int, backend: str, mode: str):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(num_tasks, backend) for _ in range(2)])
        self.mode = mode

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        for block in self.blocks:
            x = block(x) if self.mode == "none" else checkpoint(block, x, use_reentrant=self.mode == "reentrant")
        return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_activation_checkpointing_with_task_ids_context(backend, mode):
    # The recomputation runs in the backward, after the tk.task_ids block has exited: it must not silently fall
    # back to the task-major layout (wrong gradients) — a clear error, or the right gradients.
    torch.manual_seed(0)
    plain = _Checkpointed(2, backend, "none")
    ckpt = _Checkpointed(2, backend, mode)
    ckpt.load_state_dict(plain.state_dict())
    x = make_input((4, 3, 8), offset=2.0).requires_grad_()
    ids = torch.tensor([1, 0, 0, 1])
    weights = torch.randn(8)
    with tk.task_ids(ids):
        (plain(x) * weights).sum().backward()
        y = ckpt(x)
    with pytest.raises(RuntimeError, match="recomputed during the backward"):
        (y * weights).sum().backward()
    # The backward inside the block, or the replicated batch (no ids at all), recompute exactly.
    for p in ckpt.parameters():
        p.grad = None
    ckpt.load_state_dict(plain.state_dict())   # the failed step's forward advanced the running statistics
    twin = _Checkpointed(2, backend, "none")
    twin.load_state_dict(plain.state_dict())
    with tk.task_ids(ids):
        (ckpt(x) * weights).sum().backward()
        (twin(x) * weights).sum().backward()
    for ours, theirs in zip(ckpt.parameters(), twin.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, **tolerance(torch.float32))
    for p in list(ckpt.parameters()) + list(twin.parameters()):
        p.grad = None
    (ckpt(x) * weights).sum().backward()
    (twin(x) * weights).sum().backward()
    for ours, theirs in zip(ckpt.parameters(), twin.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, **tolerance(torch.float32))


def test_numpy_integer_sizes_are_accepted_as_by_nn():
    # Widths read from a numpy config array: nn.BatchNorm2d(np.int64(4)) and nn.LayerNorm(np.int64(8)) work.
    bn = tk.TSBatchNorm2d(np.int64(4), np.int32(2))
    ln = tk.TSLayerNorm(np.int64(8), np.int64(2))
    assert type(bn.num_features) is int and type(bn.num_tasks) is int and ln.normalized_shape == (8,)
    x = make_input((4, 4, 3, 3), offset=4.0)
    torch.testing.assert_close(bn(x), reference.ts_batch_norm(x, bn.weight, None, num_tasks=2),
                               **tolerance(torch.float32))
    with pytest.raises(ValueError, match="positive int"):
        tk.TSBatchNorm2d(True, 2)
    with pytest.raises(ValueError, match="positive int"):
        tk.TSLayerNorm(8.0, 2)
