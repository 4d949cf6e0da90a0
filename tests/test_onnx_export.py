"""ONNX export of models with task-specific norms, by both of torch.onnx's exporters, checked in onnxruntime.

The fused ops have no ONNX counterpart; during an export every backend runs the eager reference, which both
exporters translate, so a model built with backend="cpu" / "triton" / "cuda" exports as it is."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import tsbn_kernels as tk

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

T = 3
BACKENDS = tk.available_backends("cpu")


class MultiTaskNet(nn.Module):
    """Conv + TSσBN (fused ReLU), then tokens through TSσLN; per-sample task ids as a model input."""

    def __init__(self, backend):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = tk.TSBatchNorm2d(6, T, activation="relu", backend=backend)
        self.ln = tk.TSLayerNorm(6, T, backend=backend)

    def forward(self, x, task_ids):
        h = self.bn(self.conv(x), task_ids)
        return self.ln(h.flatten(2).transpose(1, 2), task_ids)


def _export_and_run(model, inputs, dynamo, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, inputs, dynamo=True).save(str(path))
        else:
            torch.onnx.export(model, inputs, str(path), dynamo=False)
    session = onnxruntime.InferenceSession(str(path))
    feeds = {i.name: v.numpy() for i, v in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exported_model_matches_pytorch(backend, dynamo, tmp_path):
    torch.manual_seed(0)
    model = MultiTaskNet(backend).eval()
    with torch.no_grad():                  # running statistics and gates away from their initial values
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
        model.ln.weight.normal_()
    x = torch.randn(7, 3, 5, 4) * 2 + 1
    ids = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    got = _export_and_run(model, (x, ids), dynamo, tmp_path / "model.onnx")
    with torch.no_grad():
        want = tk.reference.ts_layer_norm(
            tk.reference.ts_batch_norm(model.conv(x), model.bn.weight, None, model.bn.running_mean,
                                       model.bn.running_var, task_ids=ids, training=False,
                                       activation="relu").flatten(2).transpose(1, 2),
            model.ln.weight, None, task_ids=ids)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():                  # other ids, same graph: the task ids are an input, not a constant
        other = torch.tensor([0, 0, 0, 1, 2, 2, 1])
        session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
        names = [i.name for i in session.get_inputs()]
        out = session.run(None, {names[0]: x.numpy(), names[1]: other.numpy()})[0]
        np.testing.assert_allclose(out, model(x, other).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_jit_trace_and_a_clear_refusal_of_script(backend):
    """torch.jit.trace (which the TorchScript exporter uses) hands sizes out as tensors; the number of tasks must
    still be read as the model's constant. torch.jit.script cannot compile the layers: it says so by name."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), tk.TSBatchNorm2d(4, T, backend=backend)).eval()
    x = torch.randn(6, 3, 7, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
    fresh = torch.randn(6, 3, 7, 7)
    torch.testing.assert_close(traced(fresh), model(fresh))
    for layer in (tk.TSBatchNorm2d(4, T, backend=backend), tk.TSLayerNorm(4, T, backend=backend)):
        with pytest.raises(RuntimeError, match=f"{type(layer).__name__} does not support torch.jit.script"):
            torch.jit.script(nn.Sequential(layer))
