"""Benchmark models: torchvision-compatible names, pretrained loading, the replicated batch, and tsbn-check."""
from __future__ import annotations

import copy

import pytest
import torch

import tsbn_kernels as tk
from tsbn_kernels.pipeline import check, models, vit
from tsbn_kernels.pipeline.celeba_data import ATTRIBUTES


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


@pytest.mark.parametrize("norm", models.NORMS)
def test_pascal_vit_outputs_replicated_batch_and_task_specific_layer_norms(norm):
    torch.manual_seed(0)
    model = models.build_model("pascal", norm=norm, width=4, head_width=8, image_size=(32, 48)).double()
    norms = [m for m in model.encoder.modules() if isinstance(m, (torch.nn.LayerNorm, tk.TSLayerNorm))]
    assert len(norms) == 2 * 12 + 1
    assert all(isinstance(m, tk.TSLayerNorm if norm != "bn" else torch.nn.LayerNorm) for m in norms)
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    out = model(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "segmentation": (2, 21, 32, 48), "human_parts": (2, 7, 32, 48), "saliency": (2, 1, 32, 48),
        "normal": (2, 3, 32, 48), "edge": (2, 1, 32, 48)}
    twin = copy.deepcopy(model)
    twin.stem_once = False
    for k, v in twin(x).items():
        torch.testing.assert_close(v, out[k])
    # Another input size resizes the position embedding instead of failing.
    assert model(torch.randn(1, 3, 64, 16, dtype=torch.float64))["edge"].shape == (1, 1, 64, 16)
    if norm != "bn":
        # Task t's output depends on task t's gates only.
        with torch.no_grad():
            model.encoder.blocks[3].norm2.weight[1].add_(1.0)
        changed = model(x)
        torch.testing.assert_close(changed["segmentation"], out["segmentation"])
        assert not torch.allclose(changed["human_parts"], out["human_parts"])


def test_pascal_resnet_option_and_vit_loads_a_timm_checkpoint(tmp_path):
    model = models.build_model("pascal", arch="resnet50", width=4, head_width=8)
    assert isinstance(model.encoder.layer1[0].bn1, tk.TSBatchNorm2d)
    vit_model = vit.vit_small(image_size=(224, 224), width=4)
    state = {k: torch.randn_like(v) for k, v in vit_model.state_dict().items()}
    state["head.weight"], state["head.bias"] = torch.randn(1000, 24), torch.randn(1000)
    torch.save(state, tmp_path / "vit_s.pth")
    model = models.build_model("pascal", norm="tsbn", width=4, head_width=8, image_size=(64, 64),
                               pretrained=str(tmp_path / "vit_s.pth"))
    torch.testing.assert_close(model.encoder.blocks[5].attn.qkv.weight, state["blocks.5.attn.qkv.weight"])
    assert model.encoder.pos_embed.shape == (1, 1 + 16, 24)          # resized from the 14×14 grid
    torch.testing.assert_close(model.encoder.pos_embed[0, 0], state["pos_embed"][0, 0])
    torch.testing.assert_close(model.encoder.blocks[0].norm1.weight[2], state["blocks.0.norm1.weight"])
    del state["blocks.0.norm1.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="missing"):
        models.build_model("pascal", width=4, image_size=(64, 64), pretrained=str(tmp_path / "broken.pth"))
    with pytest.raises(ValueError, match="arch must be one of"):
        models.build_model("nyuv2", arch="vit_s")


def test_pascal_vit_at_a_non_square_size_end_to_end(tmp_path):
    from tsbn_kernels.pipeline import losses, metrics, pascal_data

    size = (32, 64)                                       # a 2×4 patch grid
    model = models.build_model("pascal", width=4, head_width=8, image_size=size)
    encoder = model.encoder
    assert encoder.grid == (2, 4) and encoder.pos_embed.shape == (1, 1 + 8, 24)
    assert encoder._position_embedding((2, 4)) is encoder.pos_embed       # used as stored, not resized
    # A square timm checkpoint (14×14 grid) is resized to the 2×4 grid.
    state = {k: torch.randn_like(v) for k, v in vit.vit_small(image_size=224, width=4).state_dict().items()}
    torch.save(state, tmp_path / "vit_s.pth")
    pretrained = models.build_model("pascal", width=4, head_width=8, image_size=size,
                                    pretrained=str(tmp_path / "vit_s.pth"))
    assert pretrained.encoder.pos_embed.shape == (1, 9, 24)
    root = pascal_data.synthesize(tmp_path / "data", 4, size=(48, 80))
    data = pascal_data.PascalContext(root, "train", size, augment=True)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=2)))
    assert batch["image"].shape == (2, 3, *size) and batch["segmentation"].shape == (2, *size)
    out = model(batch["image"])
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == dict.fromkeys(pascal_data.TASKS, size)
    assert torch.isfinite(losses.dense_losses(out, batch)).all()
    scores = metrics.BenchmarkMetrics("pascal")
    scores.update({k: v.detach() for k, v in out.items()}, batch)
    assert set(scores.compute()) == set(metrics.metric_names("pascal"))


def test_celeba_model_has_40_heads():
    model = models.build_model("celeba", width=8)
    out = model(torch.randn(2, 3, 16, 16))
    assert list(out) == list(ATTRIBUTES) and out["Young"].shape == (2, 1)
    assert model.tasks == list(ATTRIBUTES)              # train_loss keys are the metrics' attribute names


def test_check_compares_each_step_from_the_eager_state(capsys):
    """Two runs left to themselves part by ~1000× a step on this net (float64 rounding at step 1, 7e-7 at step 3,
    1e-1 at step 5: the training's own sensitivity): each step starts both from the eager state, so five steps
    pass and every difference stays at rounding; --independent shows the growth and checks step 1 only."""
    assert check.main(["cityscapes", "--steps", "5", "--size", "16", "32", "--width", "4"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] and
            line.split()[0].isdigit()]
    assert len(rows) == 5 and max(float(r[4]) for r in rows) < 1e-11, rows
    assert check.main(["cityscapes", "--steps", "5", "--size", "16", "32", "--width", "4", "--independent"]) == 0
    out = capsys.readouterr().out
    assert "independent runs" in out and "cityscapes: OK" in out


def test_check_reports_the_peak_memory_on_the_cpu_without_changing_the_training(monkeypatch, capsys):
    """On the CPU the peak comes from an untimed run of each step, after which the model returns to its state: the
    losses, the differences and the peaks are those of a check that tracks memory in its only run of each step."""
    argv = ["cityscapes", "--steps", "3", "--size", "16", "32", "--width", "4"]

    def table():
        return [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] and
                line.split()[0].isdigit()]
    assert check.main(argv) == 0
    separate = table()
    monkeypatch.setattr(check, "_peak_from_a_separate_run", lambda device: False)
    assert check.main(argv) == 0
    single = table()
    assert len(separate) == 3
    for a, b in zip(separate, single):
        # step, both losses, |Δloss|, max|Δparam|, then (ms, ms) and the peaks in MB
        assert a[:5] == b[:5] and a[7:] == b[7:], (a, b)
        assert float(a[7]) > 0 and float(a[8]) > 0


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
