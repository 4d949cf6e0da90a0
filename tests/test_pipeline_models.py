"""Benchmark models: torchvision-compatible names, pretrained loading, the replicated batch, and tsbn-check."""
from __future__ import annotations

import copy

import pytest
import torch

import tsbn_kernels as tk
from tsbn_kernels.pipeline import check, models


def test_resnet50_has_torchvision_names_and_loads_a_checkpoint(tmp_path):
    encoder = models.resnet50(width=8)
    names = set(encoder.state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias",
            "layer4.2.conv3.weight", "layer4.2.bn3.num_batches_tracked"} <= names
    assert len(names) == 318                              # torchvision's resnet50 has these plus fc.weight, fc.bias
    state = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
             for k, v in encoder.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 256), torch.randn(1000)
    torch.save(state, tmp_path / "resnet50.pth")
    model = models.build_model("cityscapes", width=8, head_width=8, pretrained=str(tmp_path / "resnet50.pth"))
    ts = model.encoder.layer2[0].bn2
    assert isinstance(ts, tk.TSBatchNorm2d)
    assert torch.equal(ts.running_mean[1], state["layer2.0.bn2.running_mean"])
    with pytest.raises(ValueError, match="does not match the encoder"):
        torch.save({"conv1.weight": torch.randn(8, 3, 7, 7), "other": torch.ones(1)}, tmp_path / "bad.pth")
        models.build_model("cityscapes", width=8, head_width=8, pretrained=str(tmp_path / "bad.pth"))


def test_dilated_resnet_keeps_output_stride_8():
    out = models.resnet50(width=8)(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 256, 8, 12)


@pytest.mark.parametrize("norm", models.NORMS)
def test_outputs_and_replicated_batch(norm):
    torch.manual_seed(0)
    model = models.build_model("nyuv2", norm=norm, width=8, head_width=8).double()
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    out = model(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"segmentation": (2, 13, 32, 48),
                                                          "depth": (2, 1, 32, 48), "normal": (2, 3, 32, 48)}
    twin = copy.deepcopy(model)
    twin.stem_once = False                               # replicate the input instead of the stem's output
    for k, v in twin(x).items():
        torch.testing.assert_close(v, out[k])
    if norm == "tsbn":
        # Converted with gate none, every task starts as a copy of the original norm: all blocks agree.
        for t in range(3):
            assert torch.equal(model.encoder.bn1.weight[t], model.encoder.bn1.weight[0])


def test_celeba_model_has_40_heads():
    model = models.build_model("celeba", width=8)
    out = model(torch.randn(2, 3, 16, 16))
    assert len(out) == 40 and out["attr39"].shape == (2, 1)


def test_check_passes_and_detects_a_broken_kernel(monkeypatch, capsys):
    assert check.main(["cityscapes", "--steps", "2", "--size", "16", "32", "--width", "4"]) == 0
    assert "cityscapes: OK" in capsys.readouterr().out
    from tsbn_kernels import dispatch

    name, impl = dispatch.resolve("auto", torch.device("cpu"), "ts_batch_norm")

    def broken(x, *args, **kwargs):
        return impl(x, *args, **kwargs) * 1.001
    monkeypatch.setitem(dispatch._registry[name].ops, "ts_batch_norm", broken)
    assert check.main(["cityscapes", "--steps", "1", "--size", "16", "32", "--width", "4"]) == 1
    assert "MISMATCH" in capsys.readouterr().out
