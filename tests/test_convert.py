"""convert_batchnorm on a ResNet-style model, the replicated batch, and gate_param_groups."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tsbn_kernels as tk


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    """Stem + two stages of nested Sequentials + one BatchNorm1d in a head: the layouts conversion must reach."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.layer2 = nn.Sequential(nn.Sequential(BasicBlock(16, 16)))
        self.head = nn.Sequential(nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 2))

    def forward(self, x):
        h = self.layer2(self.layer1(self.stem(x)))
        return self.head(h.mean(dim=(2, 3)))


def trained_resnet(seed=0) -> TinyResNet:
    """A model whose BN layers have non-trivial weights, biases and running statistics."""
    torch.manual_seed(seed)
    model = TinyResNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.2, 1.5)
                m.bias.normal_()
    model.train()
    for _ in range(3):
        model(torch.randn(8, 3, 12, 12) * 2 + 1)
    return model


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def test_every_batchnorm_replaced_and_state_copied():
    model = trained_resnet()
    original = copy.deepcopy(model)
    converted = tk.convert_batchnorm(model, num_tasks=3, gate="none")
    assert converted is model
    assert count(converted, nn.modules.batchnorm._BatchNorm) == 0
    assert count(converted, tk.TSBatchNorm2d) == 8 and count(converted, tk.TSBatchNorm1d) == 1
    for (name, bn), (_, ts) in zip(original.named_modules(), converted.named_modules()):
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            assert ts.num_tasks == 3 and ts.eps == bn.eps and ts.momentum == bn.momentum, name
            for t in range(3):
                assert torch.equal(ts.weight[t], bn.weight) and torch.equal(ts.bias[t], bn.bias)
                assert torch.equal(ts.running_mean[t], bn.running_mean)
                assert torch.equal(ts.running_var[t], bn.running_var)
            assert ts.num_batches_tracked.tolist() == [int(bn.num_batches_tracked)] * 3


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_gate_none_reproduces_original_outputs_eval_and_train(dtype, tol):
    # Same function, up to floating-point rounding (the folded scale/shift order differs from ATen's).
    model = trained_resnet().to(dtype)
    original = copy.deepcopy(model)
    converted = tk.convert_batchnorm(copy.deepcopy(model), num_tasks=3, gate="none")
    x = torch.randn(4, 3, 12, 12, dtype=dtype)
    original.eval(), converted.eval()
    torch.testing.assert_close(converted(x.repeat(3, 1, 1, 1)), original(x).repeat(3, 1), rtol=tol, atol=tol)
    # Training mode with the replicated batch: every task block sees exactly the single-task batch.
    original.train(), converted.train()
    y = converted(x.repeat(3, 1, 1, 1))
    want = original(x)
    for t in range(3):
        torch.testing.assert_close(y[4 * t:4 * (t + 1)], want, rtol=50 * tol, atol=50 * tol)
    for m_ts, m_bn in zip(converted.modules(), original.modules()):
        if isinstance(m_ts, tk.TSBatchNorm2d):
            for t in range(3):
                torch.testing.assert_close(m_ts.running_mean[t], m_bn.running_mean, rtol=50 * tol,
                                           atol=50 * tol)


def test_replicated_batch_equals_single_task_copies_after_tasks_diverge():
    """With distinct per-task gates, block t of the replicated batch is what a single-task copy of the model
    carrying task t's gates computes (forward and parameter gradients)."""
    base = trained_resnet()
    multi = tk.convert_batchnorm(copy.deepcopy(base), num_tasks=3, gate="sigmoid")
    x = torch.randn(4, 3, 12, 12)
    y = multi(x.repeat(3, 1, 1, 1))
    for t in range(3):
        single = tk.convert_batchnorm(copy.deepcopy(base), num_tasks=1, gate="sigmoid")
        with torch.no_grad():
            for m_single, m_multi in zip(single.modules(), multi.modules()):
                if isinstance(m_single, tk.modules._TSBatchNorm):
                    m_single.weight.copy_(m_multi.weight[t:t + 1])
        torch.testing.assert_close(y[4 * t:4 * (t + 1)], single(x), rtol=1e-5, atol=1e-6)
    # Gradients: the loss of task 1 reaches only row 1 of every gate.
    y[4:8].sum().backward()
    for m in multi.modules():
        if isinstance(m, tk.modules._TSBatchNorm):
            assert torch.all(m.weight.grad[[0, 2]] == 0) and torch.any(m.weight.grad[1] != 0)


def test_gate_init_copy_and_bias_options():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.25, 0.5, 0.9, 2.0]))
        bn.bias.copy_(torch.tensor([1.0, -1.0, 0.5, 0.0]))
    ts = tk.convert_batchnorm(bn, 2, gate="sigmoid", gate_init="copy", bias=True)
    assert isinstance(ts, tk.TSBatchNorm2d) and ts.gate == "sigmoid"
    torch.testing.assert_close(ts.weight.sigmoid()[1], torch.tensor([0.25, 0.5, 0.9, 1 - 1e-3]))
    assert torch.equal(ts.bias[0], bn.bias)
    assert tk.convert_batchnorm(nn.BatchNorm2d(4), 2).bias is None  # σBN default: no β
    with pytest.raises(ValueError, match="gate_init"):
        tk.convert_batchnorm(bn, 2, gate_init="zeros")


def test_sync_batchnorm_and_3d_and_frozen_requires_grad():
    model = nn.Sequential(nn.SyncBatchNorm(4), nn.BatchNorm3d(4))
    model[1].weight.requires_grad_(False)
    converted = tk.convert_batchnorm(model, 2, gate="none")
    assert type(converted[0]) is tk.TSBatchNorm and isinstance(converted[1], tk.TSBatchNorm3d)
    assert converted[0].process_group is None and converted[0].sync and not converted[1].sync
    assert not converted[1].weight.requires_grad and converted[1].bias.requires_grad
    y = converted(torch.randn(4, 4, 2, 3, 3))
    assert y.shape == (4, 4, 2, 3, 3)


def test_uninitialised_lazy_batchnorm_is_refused_and_converted_after_a_forward():
    """An uninitialised LazyBatchNorm2d is no BatchNorm2d yet: skipped, it became a plain nn.BatchNorm2d at the first
    forward, one set of statistics over all tasks, silently."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d(), nn.Sequential(nn.LazyBatchNorm1d()))
    with pytest.raises(ValueError, match="LazyBatchNorm2d is not initialised"):
        tk.convert_batchnorm(model, 2)
    model[:2](torch.randn(4, 3, 5, 5))
    model[2](torch.randn(4, 6))
    converted = tk.convert_batchnorm(model, 2)
    assert isinstance(converted[1], tk.TSBatchNorm2d) and converted[1].num_features == 4
    assert isinstance(converted[2][0], tk.TSBatchNorm1d) and converted[2][0].num_features == 6


def test_converted_model_keeps_device_dtype_and_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).to(torch.float64).eval()
    converted = tk.convert_batchnorm(model, 2)
    assert converted[1].weight.dtype == torch.float64 and not converted[1].training


def test_gate_param_groups():
    model = tk.convert_batchnorm(trained_resnet(), 3)
    model.add_module("ln", tk.TSLayerNorm(16, 3))
    groups = tk.gate_param_groups(model, lr=1e-3, weight_decay=1e-4)
    shared, gates = groups
    assert gates["lr"] == pytest.approx(1e-2) and gates["weight_decay"] == 0.0
    assert shared["lr"] == 1e-3 and shared["weight_decay"] == 1e-4
    gate_ids = {id(p) for p in gates["params"]}
    expected = {id(m.weight) for m in model.modules() if isinstance(m, (tk.modules._TSBatchNorm, tk.TSLayerNorm))}
    assert gate_ids == expected
    assert len(shared["params"]) + len(gates["params"]) == len(list(model.parameters()))
    torch.optim.Adam(groups)  # accepted as-is
    plain = tk.convert_batchnorm(trained_resnet(), 3, gate="none")
    assert [g["name"] for g in tk.gate_param_groups(plain, 1e-3)] == ["shared"]


def test_convert_layernorm_gate_none_reproduces_the_model_and_sigmoid_inits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Sequential(nn.LayerNorm(8)))
    with torch.no_grad():
        model[1].weight.uniform_(0.2, 0.9)
        model[1].bias.normal_()
    model = model.double()
    x = torch.randn(6, 5, 6, dtype=torch.float64)
    expected = model(x)
    converted = tk.convert_layernorm(copy.deepcopy(model), 3, gate="none")
    assert isinstance(converted[1], tk.TSLayerNorm) and isinstance(converted[3][0], tk.TSLayerNorm)
    assert converted[1].weight.shape == (3, 8) and converted[1].weight.dtype == torch.float64
    torch.testing.assert_close(converted(x), expected)       # every task a copy: same function on any block
    copied = tk.convert_layernorm(copy.deepcopy(model), 2, gate_init="copy")
    torch.testing.assert_close(torch.sigmoid(copied[1].weight[1]), model[1].weight)
    assert copied[1].bias is None
    drawn = tk.convert_layernorm(copy.deepcopy(model), 2)
    assert not torch.allclose(drawn[1].weight[0], drawn[1].weight[1])
    with pytest.raises(ValueError, match="gate_init"):
        tk.convert_layernorm(model, 2, gate_init="zeros")


def test_convert_layernorm_keeps_requires_grad_of_weight_and_bias():
    """A frozen LayerNorm (a frozen pretrained backbone) converts to a frozen TSLayerNorm: its β as well as its γ,
    as convert_batchnorm keeps both (the bias used to come back trainable)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.LayerNorm(8))
    model[1].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    converted = tk.convert_layernorm(model, 2, gate="none")
    assert not converted[1].weight.requires_grad and not converted[1].bias.requires_grad
    assert converted[2].weight.requires_grad and not converted[2].bias.requires_grad
    trainable = [n for n, p in converted.named_parameters() if p.requires_grad]
    assert trainable == ["0.weight", "0.bias", "2.weight"]


@pytest.mark.parametrize("convert,norm", [(tk.convert_batchnorm, nn.BatchNorm2d), (tk.convert_layernorm, nn.LayerNorm)])
def test_frozen_norm_with_random_gates_warns_once(convert, norm, recwarn):
    """Random sigmoid gates on a frozen norm never train: the pretrained function is changed for good. One warning
    for the whole model (not one per norm), none for gate_init='copy', gate='none' or trainable norms."""
    import warnings

    model = nn.Sequential(*(norm(4) for _ in range(5)))
    model.requires_grad_(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        convert(copy.deepcopy(model), 2)
    assert [str(w.message).count("gate_init='copy'") for w in caught] == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(copy.deepcopy(model), 2, gate_init="copy")
        convert(copy.deepcopy(model), 2, gate="none")
        convert(nn.Sequential(norm(4)), 2)


def test_a_shared_norm_stays_one_shared_layer():
    """A norm used twice (or registered under two names) becomes one task-specific layer, not a converted copy
    and a leftover nn.BatchNorm2d (named_children() yields such a module once)."""
    bn, ln = nn.BatchNorm2d(4), nn.LayerNorm(4)
    body = nn.Sequential(nn.Conv2d(4, 4, 1), bn, nn.ReLU(), nn.Conv2d(4, 4, 1), bn)
    model = nn.ModuleDict({"a": body, "b": nn.Sequential(bn), "ln1": ln, "ln2": ln})
    tk.convert_batchnorm(model, num_tasks=2)
    tk.convert_layernorm(model, num_tasks=2)
    assert isinstance(body[1], tk.TSBatchNorm2d)
    assert body[1] is body[4] is model["b"][0]
    assert isinstance(model["ln1"], tk.TSLayerNorm) and model["ln1"] is model["ln2"]
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) for m in model.modules())


@pytest.mark.parametrize("gate", ["sigmoid", "none"])
def test_tied_norm_parameters_stay_tied(gate):
    """Two norms sharing one weight and bias Parameter (separate statistics, tied affine) share the converted [T, C]
    Parameters, as nn.SyncBatchNorm.convert_sync_batchnorm keeps the tie; each used to get its own copy."""
    torch.manual_seed(0)
    a, b, la, lb = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.LayerNorm(4), nn.LayerNorm(4)
    b.weight, b.bias, lb.weight, lb.bias = a.weight, a.bias, la.weight, la.bias
    model = nn.Sequential(a, nn.Conv2d(4, 4, 1), b, la, lb)
    tk.convert_batchnorm(model, 3, gate=gate, bias=True)
    tk.convert_layernorm(model, 3, gate=gate, bias=True)
    assert model[0].weight is model[2].weight and model[0].bias is model[2].bias
    assert model[3].weight is model[4].weight and model[3].bias is model[4].bias
    assert model[0].running_mean is not model[2].running_mean
    assert len(list(model.parameters())) == 2 + 2 + 2
    model(torch.randn(6, 4, 3, 4)).sum().backward()
    assert model[0].weight.grad.shape == (3, 4)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_convert_layernorm_refuses_sequence_first_transformer_layers():
    """torch's transformer layers default to batch_first=False: their norms get [seq, batch, features], and a
    TSLayerNorm splits dim 0 by task, so the converted layer gave tasks sequence positions (5.9 off the per-task
    layers at T=2), silently. Refused by name, leaving the model unchanged; batch_first=True converts."""
    torch.manual_seed(0)
    seq_first = nn.ModuleDict({"enc": nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)})
    with pytest.raises(ValueError, match="enc .TransformerEncoderLayer. has batch_first=False"):
        tk.convert_layernorm(seq_first, 2)
    assert isinstance(seq_first["enc"].norm1, nn.LayerNorm)
    with pytest.raises(ValueError, match="TransformerDecoderLayer"):
        tk.convert_layernorm(nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0), 2)
    with pytest.raises(ValueError, match="batch_first=False"):
        tk.convert_layernorm(nn.Transformer(8, 2, 1, 1, 16, dropout=0.0), 2)
    converted = tk.convert_layernorm(nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True), 2)
    assert not any(isinstance(m, nn.LayerNorm) for m in converted.modules())


@pytest.mark.parametrize("gate", ["sigmoid", "none"])
def test_converted_transformer_encoder_in_inference(gate):
    """nn.TransformerEncoder(Layer)'s inference fast paths (a fused kernel reading the norms' weights as [D], nested
    tensors for padding masks) cannot hold task-specific norms: after conversion eval, no_grad and inference_mode
    compute what the layers' plain path computes, per-sample task ids included."""
    torch.manual_seed(0)

    def encoder():
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        return tk.convert_layernorm(nn.TransformerEncoder(layer, 2, enable_nested_tensor=True), 3, gate=gate)
    model, plain = encoder(), encoder()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, tk.TSLayerNorm):
                m.weight.normal_()
        plain.load_state_dict(model.state_dict())
    model.eval()
    plain.train()           # training mode takes the plain path (dropout is 0)
    x = torch.randn(6, 5, 8)
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[:, -1] = True
    with tk.task_ids(torch.tensor([0, 1, 2, 0, 1, 2])):
        want = plain(x, src_key_padding_mask=mask)
        for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
            with mode():
                got = model(x, src_key_padding_mask=mask)
            torch.testing.assert_close(got[:, :-1], want[:, :-1].detach(), rtol=1e-5, atol=1e-5)
