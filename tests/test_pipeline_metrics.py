"""Every metric against values computed by hand on tiny inputs."""
from __future__ import annotations

import math

import pytest
import torch

from tsbn_kernels.pipeline import metrics


def test_segmentation_confusion_miou_and_pixel_accuracy():
    seg = metrics.Segmentation(3)
    label = torch.tensor([[0, 0, 1, -1], [2, 2, 1, 0]])
    pred = torch.tensor([[0, 1, 1, 2], [2, 0, 1, 0]])
    seg.update(pred.unsqueeze(0), label.unsqueeze(0))
    # 7 valid pixels, 5 correct. Per class, over the valid pixels:
    # class 0: tp 2 (positions [0,0], [1,3]), fp 1 ([1,1]), fn 1 ([0,1]) -> 2/4
    # class 1: tp 2 ([0,2], [1,2]), fp 1 ([0,1]), fn 0 -> 2/3
    # class 2: tp 1 ([1,0]), fp 0 (the ignored pixel does not count), fn 1 ([1,1]) -> 1/2
    out = seg.compute()
    assert out["miou"] == pytest.approx((2 / 4 + 2 / 3 + 1 / 2) / 3)
    assert out["pix_acc"] == pytest.approx(5 / 7)
    logits = torch.nn.functional.one_hot(pred, 3).permute(2, 0, 1).float().unsqueeze(0)
    seg2 = metrics.Segmentation(3)
    seg2.update(logits, label.unsqueeze(0))
    assert seg2.compute() == out
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        seg.update(pred, torch.full_like(label, 5))


def test_depth_only_valid_pixels():
    depth = metrics.Depth()
    target = torch.tensor([[1.0, 2.0, 0.0, 4.0]])
    pred = torch.tensor([[1.5, 1.0, 9.0, 4.0]])
    depth.update(pred, target)
    out = depth.compute()
    assert out["abs_err"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert out["rel_err"] == pytest.approx((0.5 / 1 + 1.0 / 2 + 0) / 3)


def test_normals_angles_median_and_thresholds():
    normals = metrics.Normals()
    target = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 0]]).T.reshape(1, 3, 4, 1)
    angles = [0.0, 20.0, 45.0]
    pred_vectors = [[math.cos(math.radians(a)), math.sin(math.radians(a)), 0.0] for a in angles[:2]]
    pred_vectors.append([math.sin(math.radians(45)), math.cos(math.radians(45)), 0.0])  # 45° from (0,1,0)
    pred_vectors.append([0.3, 0.3, 0.3])  # invalid pixel: ignored
    pred = torch.tensor(pred_vectors).T.reshape(1, 3, 4, 1) * 2.0  # unnormalised on purpose
    normals.update(pred, target)
    out = normals.compute()
    assert out["mean_angle"] == pytest.approx(65 / 3, abs=1e-6)
    assert out["median_angle"] == pytest.approx(20.0, abs=1e-3)
    assert out["within_11.25"] == pytest.approx(1 / 3)
    assert out["within_22.5"] == pytest.approx(2 / 3) and out["within_30"] == pytest.approx(2 / 3)


def test_binary_attributes_accuracy_and_f1():
    attrs = metrics.BinaryAttributes(2)
    logits = torch.tensor([[2.0, -1.0], [1.0, 1.0], [-3.0, -2.0], [0.5, 2.0]])
    target = torch.tensor([[1, 0], [0, 1], [0, 1], [1, 1]])
    attrs.update(logits, target)
    per = attrs.per_attribute()
    # attribute 0: pred 1,1,0,1 vs 1,0,0,1 -> tp 2 fp 1 fn 0 tn 1: acc 3/4, f1 4/5
    # attribute 1: pred 0,1,0,1 vs 0,1,1,1 -> tp 2 fp 0 fn 1 tn 1: acc 3/4, f1 4/5
    torch.testing.assert_close(per["accuracy"], torch.tensor([0.75, 0.75], dtype=torch.float64))
    torch.testing.assert_close(per["f1"], torch.tensor([0.8, 0.8], dtype=torch.float64))


def test_delta_m_conventions():
    base = {"miou": 0.5, "abs_err": 2.0}
    # mIoU up 10% (better: counts negative), abs err up 10% (worse: counts positive) -> 0
    assert metrics.delta_m({"miou": 0.55, "abs_err": 2.2}, base) == pytest.approx(0.0)
    assert metrics.delta_m({"miou": 0.55, "abs_err": 1.8}, base) == pytest.approx(-10.0)
    assert metrics.delta_m(dict(metrics.BASELINES["nyuv2"]), metrics.BASELINES["nyuv2"]) == 0.0
    per_task = {"seg": {"miou": 0.55}, "depth": {"abs_err": 1.8}}
    assert metrics.delta_m_per_task(per_task, base) == pytest.approx(-10.0)
    with pytest.raises(ValueError, match="no metric in common"):
        metrics.delta_m({"f1": 1.0}, base)
