"""TS norm modules: nn.BatchNorm-compatible construction, state, modes, dispatch and the task_ids context."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tsbn_kernels as tk
from conftest import make_input


def test_state_dict_names_and_shapes():
    bn = tk.TSBatchNorm2d(8, 3)
    sd = bn.state_dict()
    assert set(sd) == {"weight", "running_mean", "running_var", "num_batches_tracked"}  # σBN: no bias
    assert sd["weight"].shape == (3, 8) and sd["running_var"].shape == (3, 8)
    assert sd["num_batches_tracked"].shape == (3,) and sd["num_batches_tracked"].dtype == torch.long
    plain = tk.TSBatchNorm2d(8, 3, gate="none")
    assert set(plain.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert torch.equal(plain.weight, torch.ones(3, 8)) and torch.equal(plain.bias, torch.zeros(3, 8))
    assert tk.TSBatchNorm2d(8, 3, bias=True).bias is not None
    assert tk.TSBatchNorm2d(8, 3, gate="none", bias=False).bias is None
    no_affine = tk.TSBatchNorm2d(8, 3, affine=False, track_running_stats=False)
    assert no_affine.state_dict() == {} and no_affine.weight is None


def test_gate_logits_initialised_standard_normal():
    torch.manual_seed(0)
    w = tk.TSBatchNorm2d(4096, 4).weight
    assert abs(w.mean().item()) < 0.02 and abs(w.std().item() - 1.0) < 0.02


def test_training_updates_each_task_and_eval_uses_running_stats():
    torch.manual_seed(0)
    bn = tk.TSBatchNorm2d(5, 2, gate="none", bias=True)
    x = torch.cat([torch.randn(4, 5, 6, 6) + 3.0, torch.randn(4, 5, 6, 6) * 2 - 1.0])
    y = bn(x)
    assert bn.num_batches_tracked.tolist() == [1, 1]
    for t, rows in enumerate((slice(0, 4), slice(4, 8))):
        rm, rv = torch.zeros(5), torch.ones(5)
        want = F.batch_norm(x[rows], rm, rv, None, None, True, 0.1, 1e-5)
        torch.testing.assert_close(y[rows], want)
        torch.testing.assert_close(bn.running_mean[t], rm)
        torch.testing.assert_close(bn.running_var[t], rv)
    bn.eval()
    y_eval = bn(x)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    want = F.batch_norm(x[:4], rm[0], rv[0], None, None, False, 0.1, 1e-5)
    torch.testing.assert_close(y_eval[:4], want)
    assert torch.equal(bn.running_mean, rm) and bn.num_batches_tracked.tolist() == [1, 1]


def test_momentum_none_cumulative_average_counts_only_present_tasks():
    torch.manual_seed(0)
    bn = tk.TSBatchNorm1d(3, 2, momentum=None)
    batches = [torch.randn(6, 3) + i for i in range(3)]
    ids = [torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 0, 0, 0, 0]), torch.tensor([1, 1, 0, 0, 1, 0])]
    for x, t in zip(batches, ids):
        bn(x, t)
    assert bn.num_batches_tracked.tolist() == [3, 2]
    # Task 1 saw batches 0 and 2: its running mean is the plain average of their means.
    want_t1 = (batches[0][3:].mean(0) + batches[2][[0, 1, 4]].mean(0)) / 2
    torch.testing.assert_close(bn.running_mean[1], want_t1)
    ref = nn.BatchNorm1d(3, momentum=None)
    for x, t in zip(batches, ids):
        ref(x[t == 0])
    torch.testing.assert_close(bn.running_mean[0], ref.running_mean)
    torch.testing.assert_close(bn.running_var[0], ref.running_var)


def test_no_running_stats_uses_batch_stats_in_eval():
    bn = tk.TSBatchNorm2d(3, 2, track_running_stats=False, gate="none").eval()
    x = make_input((4, 3, 5, 5), offset=2.0)
    y = bn(x)
    torch.testing.assert_close(y[:2], F.batch_norm(x[:2], None, None, training=True))


def test_track_running_stats_but_not_updated_outside_training():
    bn = tk.TSBatchNorm2d(3, 2).eval()
    before = bn.running_mean.clone()
    bn(make_input((4, 3, 2, 2)))
    assert torch.equal(bn.running_mean, before)


def test_task_ids_context_reaches_nested_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), tk.TSBatchNorm2d(4, 3), nn.ReLU(), tk.TSBatchNorm2d(4, 3))
    x = torch.randn(5, 3, 6, 6)
    ids = torch.tensor([2, 0, 1, 2, 2])
    with tk.task_ids(ids):
        y_ctx = model(x)
    assert tk.context.current_task_ids() is None
    h = model[2](model[1](model[0](x), task_ids=ids))
    torch.testing.assert_close(y_ctx, model[3](h, task_ids=ids))
    with pytest.raises(ValueError, match="not divisible"):
        model(x)  # outside the context: task-major blocks, 5 rows cannot split into 3 tasks


def test_explicit_task_ids_win_over_context():
    bn = tk.TSBatchNorm1d(2, 2, gate="none")
    x = make_input((4, 2), offset=1.0)
    with tk.task_ids(torch.tensor([0, 0, 1, 1])):
        a = bn(x, torch.tensor([0, 1, 0, 1]))
    b = bn(x, torch.tensor([0, 1, 0, 1]))
    torch.testing.assert_close(a, b)


def test_activation_relu_and_backend_attribute():
    bn = tk.TSBatchNorm2d(3, 2, activation="relu", backend="eager")
    y = bn(make_input((4, 3, 3, 3)))
    assert (y >= 0).all() and (y == 0).any()
    bn.backend = "no-such-backend"
    with pytest.raises(ValueError, match="available there"):
        bn(make_input((4, 3, 3, 3)))


@pytest.mark.parametrize("cls,shape", [(tk.TSBatchNorm1d, (4, 3)), (tk.TSBatchNorm1d, (4, 3, 5)),
                                       (tk.TSBatchNorm2d, (4, 3, 2, 5)), (tk.TSBatchNorm3d, (4, 3, 2, 2, 3)),
                                       (tk.TSBatchNorm, (4, 3, 2, 2, 3))])
def test_ranks(cls, shape):
    bn = cls(3, 2)
    y = bn(make_input(shape, offset=1.0))
    assert y.shape == shape
    y.sum().backward()
    assert bn.weight.grad.shape == (2, 3)


def test_half_module_and_autocast_style_mixed_precision():
    x = make_input((4, 3, 4, 4), torch.bfloat16, offset=1.0)
    mixed = tk.TSBatchNorm2d(3, 2)  # fp32 parameters, bf16 input: output bf16, statistics fp32
    assert mixed(x).dtype == torch.bfloat16 and mixed.running_mean.dtype == torch.float32
    half = tk.TSBatchNorm2d(3, 2).to(torch.bfloat16)
    assert half(x).dtype == torch.bfloat16


def test_layer_norm_module():
    ln = tk.TSLayerNorm(8, 3)
    assert set(ln.state_dict()) == {"weight"} and ln.weight.shape == (3, 8)
    assert set(tk.TSLayerNorm((2, 8), 3, gate="none").state_dict()) == {"weight", "bias"}
    x = make_input((6, 5, 8))
    y = ln(x)
    want = F.layer_norm(x[4:], (8,)) * ln.weight[2].sigmoid()
    torch.testing.assert_close(y[4:], want)
    with tk.task_ids(torch.tensor([1, 1, 1, 1, 1, 1])):
        torch.testing.assert_close(ln(x), F.layer_norm(x, (8,)) * ln.weight[1].sigmoid())


def test_gate_values_and_repr():
    bn = tk.TSBatchNorm2d(3, 2)
    torch.testing.assert_close(bn.gate_values(), bn.weight.sigmoid())
    assert "num_tasks=2" in repr(bn) and "gate='sigmoid'" in repr(bn)


def test_available_backends_lists_eager_first():
    names = tk.available_backends("cpu")
    assert names[0] == "eager"
    assert tk.available_backends(torch.device("cpu"), "ts_layer_norm")[0] == "eager"


def test_torch_compile_fullgraph_replicated_batch():
    """The task-major layout needs no host sync, so a converted model compiles without graph breaks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), tk.TSBatchNorm2d(4, 3, momentum=None, activation="relu"),
                          nn.Flatten(), nn.Linear(4 * 16, 5), tk.TSBatchNorm1d(5, 3, gate="none"))
    twin = copy.deepcopy(model)
    x = make_input((6, 3, 6, 6), offset=1.0)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), twin(x))
    torch.testing.assert_close(model[1].running_var, twin[1].running_var)
    assert model[1].num_batches_tracked.tolist() == [1, 1, 1]
    ln = tk.TSLayerNorm(8, 3)
    tokens = make_input((6, 2, 8), offset=1.0)
    torch.testing.assert_close(torch.compile(ln, fullgraph=True, backend="aot_eager")(tokens), ln(tokens))
