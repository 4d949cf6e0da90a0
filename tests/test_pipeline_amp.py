"""tsbn-train --amp: float16 runs with a loss scale (overflowed steps skipped, the scale saved for an exact
resume); bfloat16 needs none."""
from __future__ import annotations

import json

import torch

from tsbn_kernels.pipeline import train


def run(out, *extra):
    return train.main(["nyuv2", "--out", str(out), "--width", "4", "--batch", "2", "--train-size", "32",
                       "--val-size", "2", "--size", "16", "24", "--aggregator", "pcgrad", "--epochs", "1", *extra])


def test_float16_run_skips_overflowed_steps_trains_and_resumes_with_its_loss_scale_bitwise(tmp_path):
    assert run(tmp_path / "full", "--amp", "fp16") == 0
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    (entry,) = json.loads((tmp_path / "full" / "metrics.json").read_text())
    # The initial scale (2^16) overflows this net's float16 gradients (up to ~500 unscaled): the first steps are
    # skipped, each halving the scale, and the later ones train. The split run stops while the scale is falling.
    assert 0 < entry["skipped_steps"] < 16, entry
    assert full["scaler"]["scale"] == 2.0 ** 16 / 2 ** entry["skipped_steps"]
    torch.manual_seed(0)                                 # the run's seed: its initial model
    start = train.build_model("nyuv2", "tssigmabn", 4, 16, image_size=(16, 24)).state_dict()
    moved = [k for k, v in start.items() if v.is_floating_point() and not torch.equal(v, full["model"][k])
             and "running" not in k]
    assert any(k.startswith("encoder.conv1") for k in moved), moved     # the steps not skipped trained
    assert run(tmp_path / "split", "--amp", "fp16", "--steps", "6") == 0
    assert run(tmp_path / "split", "--amp", "fp16", "--resume") == 0
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert split["step"] == full["step"] == 16
    assert split["scaler"] == full["scaler"]
    for key, value in full["model"].items():
        assert torch.equal(value, split["model"][key]), key


def test_bfloat16_has_no_loss_scale(tmp_path):
    assert run(tmp_path / "bf16", "--amp", "bf16", "--steps", "2") == 0
    assert torch.load(tmp_path / "bf16" / "checkpoint.pt", weights_only=True)["scaler"] == {}
    assert "skipped_steps" not in json.loads((tmp_path / "bf16" / "metrics.json").read_text())[0]
