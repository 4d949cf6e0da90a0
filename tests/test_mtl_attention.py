"""OneBackward through nn.MultiheadAttention and nn.Transformer*Layer: the per-task gradients of every attention
parameter (fused in_proj, separate q/k/v weights, bias_k/bias_v, out_proj) from one backward against T autograd
passes, in every configuration of the module's forward; and the refusals where a split would be wrong."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tsbn_kernels as tk
from tsbn_kernels import mtl
from tsbn_kernels.mtl import attention

T, N, L, E = 3, 2, 5, 8


def _block_losses(y, num_tasks=T):
    """Task t's loss from block t of the batch, weighted differently; y's batch dimension comes first."""
    return (y.reshape(num_tasks, -1) ** 2).mean(dim=1) * torch.arange(1, num_tasks + 1, dtype=y.dtype)


class AttentionNet(nn.Module):
    """Task-specific LayerNorm, then an nn.MultiheadAttention (self or cross), then a shared Linear."""

    def __init__(self, batch_first=True, kdim=None, vdim=None, add_bias_kv=False, add_zero_attn=False, bias=True,
                 cross=False, shared_kv=False):
        super().__init__()
        self.batch_first, self.cross, self.shared_kv = batch_first, cross, shared_kv
        self.ln = tk.TSLayerNorm(E, T)
        self.mha = nn.MultiheadAttention(E, 2, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
                                         kdim=kdim, vdim=vdim, batch_first=batch_first)
        self.fc = nn.Linear(E, 4)

    def forward(self, x, memory_k=None, memory_v=None, **kwargs):
        h = self.ln(x)                                   # [B, L, E]
        q = h if self.batch_first else h.transpose(0, 1)
        if self.cross:
            k = memory_k if self.batch_first else memory_k.transpose(0, 1)
            v = k if self.shared_kv else (memory_v if self.batch_first else memory_v.transpose(0, 1))
        else:
            k = v = q
        out, weights = self.mha(q, k, v, **kwargs)
        if not self.batch_first:
            out = out.transpose(0, 1)
        y = self.fc(out)
        return y if weights is None else (y, weights)


def _compare(net, run, tol=1e-10):
    """G from one backward equals T autograd passes, over every trainable parameter of the net but the norms'."""
    with mtl.OneBackward(net, T) as capture:
        losses = run()
    G, _ = capture.gradients(losses)
    shared = capture.params
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[id(p)] for p in shared} == {n for n, p in net.named_parameters() if not n.startswith("ln.")}
    want = mtl.autograd_gradients(run(), shared)
    assert (want.abs().sum(dim=1) > 0).all()
    torch.testing.assert_close(G, want, rtol=tol, atol=tol)
    assert "forward" not in vars(net.mha)          # the capture gives the module its own forward back
    return G


CONFIGS = {
    "self": dict(),
    "self_seq_first": dict(batch_first=False),
    "bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True),
    "no_bias": dict(bias=False),
    "cross": dict(cross=True),
    "cross_shared_kv": dict(cross=True, shared_kv=True),
    "kdim_vdim": dict(cross=True, kdim=6, vdim=7),
    "kdim_vdim_seq_first": dict(cross=True, kdim=6, vdim=7, batch_first=False, add_bias_kv=True),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("need_weights", [True, False])
def test_one_backward_splits_multihead_attention(config, need_weights):
    torch.manual_seed(0)
    kw = CONFIGS[config]
    net = AttentionNet(**kw).double()
    x = torch.randn(T * N, L, E, dtype=torch.float64) * 3 + 1
    mk = torch.randn(T * N, L + 1, kw.get("kdim") or E, dtype=torch.float64)
    mv = torch.randn(T * N, L + 1, kw.get("vdim") or E, dtype=torch.float64)

    def run():
        out = net(x, mk, mv, need_weights=need_weights)
        return _block_losses(out[0] if need_weights else out)
    _compare(net, run)


@pytest.mark.parametrize("mask", ["bool_attn", "float_attn", "padding", "padding_and_causal", "causal_hint",
                                  "per_head_3d"])
def test_one_backward_with_attention_masks(mask):
    torch.manual_seed(1)
    net = AttentionNet().double()
    B = T * N
    x = torch.randn(B, L, E, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[::2, -2:] = True                    # some samples attend to fewer keys
    kwargs = {"bool_attn": dict(attn_mask=torch.triu(torch.ones(L, L, dtype=torch.bool), 1)),
              "float_attn": dict(attn_mask=torch.randn(L, L, dtype=torch.float64)),
              "padding": dict(key_padding_mask=padding),
              "padding_and_causal": dict(key_padding_mask=padding.double().masked_fill(padding, float("-inf")),
                                         attn_mask=causal),
              "causal_hint": dict(attn_mask=causal, is_causal=True, need_weights=False),
              "per_head_3d": dict(attn_mask=torch.randn(B * 2, L, L, dtype=torch.float64))}[mask]

    def run():
        out = net(x, **kwargs)
        return _block_losses(out if isinstance(out, torch.Tensor) else out[0])
    _compare(net, run)


def test_one_backward_with_per_sample_task_ids_through_attention():
    torch.manual_seed(2)
    net = AttentionNet(add_bias_kv=True).double()
    ids = torch.tensor([1, 0, 2, 2, 0, 1, 1, 2])              # ragged: sizes 2, 3, 3
    x = torch.randn(len(ids), L, E, dtype=torch.float64) + 2

    def run():
        with tk.task_ids(ids):
            y, _ = net(x)
        return torch.stack([(y[ids == t] ** 2).mean() * (t + 1) for t in range(T)])
    _compare(net, run)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_one_backward_through_a_transformer_encoder(norm_first, training):
    """An nn.TransformerEncoder of batch-first layers with TSσLN: in eval mode the layer would take its fused
    inference path if nothing required grad; in training mode dropout runs (both gradients of the one captured
    forward: the functional forward draws its dropout masks differently from torch's)."""
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(E, 2, 16, dropout=0.1, batch_first=True, norm_first=norm_first)
    encoder = tk.convert_layernorm(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), T).double()
    encoder.train(training)
    x = torch.randn(T * N, L, E, dtype=torch.float64)
    with mtl.OneBackward(encoder, T) as capture:
        losses = _block_losses(encoder(x)[..., :3])
    want = mtl.autograd_gradients(losses, capture.params)        # (keeps the graph)
    G, _ = capture.gradients(losses)
    torch.testing.assert_close(G, want, rtol=1e-10, atol=1e-10)
    names = {id(p): n for n, p in encoder.named_parameters()}
    assert {names[id(p)] for p in capture.params} == {n for n, p in encoder.named_parameters() if "norm" not in n}
    assert want.abs().max() > 1e-3


def test_one_backward_through_attention_under_autocast():
    torch.manual_seed(4)
    net = AttentionNet(add_bias_kv=True)
    x = torch.randn(T * N, L, E)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = net(x)
        return _block_losses(y.float())
    with mtl.OneBackward(net, T) as capture:
        losses = run()
    G, _ = capture.gradients(losses)
    want = mtl.autograd_gradients(run(), capture.params)
    torch.testing.assert_close(G, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_aggregated_step_through_attention_fills_every_grad():
    torch.manual_seed(5)
    net = AttentionNet(cross=True, kdim=6, vdim=7).double()
    x, mk, mv = (torch.randn(T * N, L, d, dtype=torch.float64) for d in (E, 6, 7))
    with mtl.OneBackward(net, T) as capture:
        losses = _block_losses(net(x, mk, mv)[0])
    mtl.backward_aggregated(losses, method="upgrad", capture=capture, task_params=list(net.ln.parameters()))
    G = mtl.autograd_gradients(_block_losses(net(x, mk, mv)[0]), capture.params)
    got = torch.cat([p.grad.reshape(-1) for p in capture.params])
    torch.testing.assert_close(got, mtl.aggregate(G, "upgrad"), rtol=1e-8, atol=1e-10)
    assert all(p.grad is not None for p in net.parameters())


class _OwnForward(nn.MultiheadAttention):
    def forward(self, query, key, value, **kwargs):
        return super().forward(query * 2, key, value, **kwargs)


def test_refusals_name_the_attention_module():
    x = torch.randn(T * N, L, E)
    net = AttentionNet()
    net.mha = _OwnForward(E, 2, batch_first=True)
    with pytest.raises(ValueError, match="OneBackward cannot split the gradients of mha: _OwnForward overrides"):
        mtl.OneBackward(net, T)
    with mtl.OneBackward(net, T, modules=[net.fc]) as capture:     # left out: its parameters are task_params
        losses = _block_losses(net(x)[0])
    G, _ = capture.gradients(losses, list(net.mha.parameters()) + list(net.ln.parameters()))
    torch.testing.assert_close(G, mtl.autograd_gradients(_block_losses(net(x)[0]), capture.params))

    net = AttentionNet()                # unbatched query: no batch dimension to split
    with pytest.raises(ValueError, match="unbatched"):
        with mtl.OneBackward(net, T):
            net.mha(torch.randn(L, E), torch.randn(L, E), torch.randn(L, E))
    assert "forward" not in vars(net.mha)

    # A seq-first transformer layer with a task-specific norm would split the sequence into task blocks.
    layer = nn.TransformerEncoderLayer(E, 2, 16, dropout=0.0)       # (convert_layernorm refuses this one)
    layer.norm1 = tk.TSLayerNorm(E, T)
    with pytest.raises(ValueError, match="batch_first=False transformer layer"):
        with mtl.OneBackward(layer, T):
            layer(torch.randn(L, T * N, E))

    # The weights used by a functional call that bypasses the module's forward: the split is unknown.
    net = AttentionNet()
    with mtl.OneBackward(net, T) as capture:
        h = net.ln(x).transpose(0, 1)
        out, _ = nn.functional.multi_head_attention_forward(
            h, h, h, E, 2, net.mha.in_proj_weight, net.mha.in_proj_bias, None, None, False, 0.0,
            net.mha.out_proj.weight, net.mha.out_proj.bias, training=False)
        losses = _block_losses(net.fc(out.transpose(0, 1)))
    with pytest.raises(ValueError, match="mha's parameters got a gradient but it never ran through"):
        capture.gradients(losses)


def test_functional_forward_matches_torch_and_checks_itself(monkeypatch):
    """mha_forward equals torch's forward (checked once per configuration); a torch that computed something else
    would be caught by that check, not silently split."""
    torch.manual_seed(6)
    mha = nn.MultiheadAttention(E, 2, batch_first=True, add_bias_kv=True).eval()
    q = torch.randn(4, L, E)
    want, want_w = mha(q, q, q)
    got, got_w = attention.mha_forward(mha, q, q, q)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_w, want_w)

    def wrong(self, query, key, value, **kwargs):
        out, w = real(self, query, key, value, **kwargs)
        return out + 1e-2, w
    real = nn.MultiheadAttention.forward
    monkeypatch.setattr(nn.MultiheadAttention, "forward", wrong)
    with pytest.raises(RuntimeError, match="differs from torch's"):
        attention.check_against_torch(mha, (q, q, q), {})


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LN_BACKENDS = [b for b in tk.available_backends(DEVICE, op="ts_layer_norm") if b != "eager"] or ["eager"]


@pytest.mark.parametrize("backend", LN_BACKENDS)
def test_one_backward_through_a_transformer_on_its_device(backend):
    """What gpu_check.sh runs on a GPU: batch-first encoder layers with fused TSσLN kernels on DEVICE, fp32 (the
    SDPA path of need_weights=False, as nn.TransformerEncoderLayer calls it), against a float64 CPU truth."""
    torch.manual_seed(8)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    encoder = tk.convert_layernorm(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), T, backend=backend)
    x = torch.randn(T * N, 7, 16) * 2 + 1
    truth_model = copy.deepcopy(encoder).double()
    for m in truth_model.modules():
        if isinstance(m, tk.TSLayerNorm):
            m.backend = "eager"
    want = mtl.autograd_gradients(_block_losses(truth_model(x.double())[..., :5]), list(truth_model.parameters()))
    encoder = encoder.to(DEVICE)
    with mtl.OneBackward(encoder, T) as capture:
        losses = _block_losses(encoder(x.to(DEVICE))[..., :5])
    G, _ = capture.gradients(losses, [p for p in encoder.parameters() if all(p is not q for q in capture.params)])
    index = {id(p): i for i, p in enumerate(encoder.parameters())}
    sizes = [p.numel() for p in encoder.parameters()]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    columns = torch.cat([torch.arange(starts[index[id(p)]], starts[index[id(p)]] + p.numel())
                         for p in capture.params])
    torch.testing.assert_close(G.cpu().double(), want[:, columns], rtol=1e-4, atol=1e-4 * want.abs().max().item())
