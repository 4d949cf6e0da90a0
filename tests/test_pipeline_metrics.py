"""Every metric against values computed by hand on tiny inputs."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from tsbn_kernels.pipeline import celeba_data, metrics


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


def test_median_angle_of_an_even_count_is_the_mean_of_the_middle_two():
    normals = metrics.Normals()
    angles = [10.0, 40.0, 50.0, 70.0]
    pred = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a)), 0.0] for a in angles])
    normals.update(pred.T.reshape(1, 3, 4, 1), torch.tensor([[1.0, 0, 0]] * 4).T.reshape(1, 3, 4, 1))
    assert normals.compute()["median_angle"] == pytest.approx(np.median(angles), abs=1e-3)


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


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p))


def test_saliency_max_f_beta_and_miou_over_thresholds():
    sal = metrics.Saliency()
    probs = [0.905, 0.805, 0.305, 0.105]
    truth = torch.tensor([1.0, 0.0, 1.0, 0.0])
    # Split over two batches: the counts of the whole split decide, not per-batch scores.
    sal.update(logit(probs[:2]).view(1, 1, 1, 2), truth[:2].view(1, 1, 1, 2))
    sal.update(logit(probs[2:]).view(1, 1, 1, 2), truth[2:].view(1, 1, 1, 2))
    out = sal.compute()
    # threshold in (0.805, 0.905): P = 1, R = 1/2 -> F_0.3 = 1.3·0.5 / (0.3 + 0.5); other thresholds score lower.
    assert out["max_f"] == pytest.approx(1.3 * 0.5 / 0.8)
    # IoU(fg) = 1/2, IoU(bg) = 2/3 there, and 2/3, 1/2 for thresholds in (0.105, 0.305).
    assert out["miou"] == pytest.approx(7 / 12)


def test_edge_proxy_ods_f_with_the_distance_tolerance():
    truth = torch.zeros(1, 1, 8, 8)
    truth[..., :, 3] = 1
    prob = torch.full((1, 1, 8, 8), 0.05, dtype=torch.float64)
    prob[..., 0:4, 4] = 0.9          # next to the true edge: within the 1-pixel tolerance
    prob[..., :, 7] = 0.95           # far from it
    edges = metrics.Edges()
    edges.update(logit(prob), truth)
    # θ in (0.05, 0.9): P = 4/12, R = 5/8 (row 4 of the edge is diagonal to row 3 of the prediction) -> 10/23;
    # θ < 0.05: every pixel predicted, P = 24/64 (columns 2..4 lie near the edge), R = 1 -> 6/11, the best.
    assert edges.compute()["ods_f"] == pytest.approx(6 / 11)


def test_pascal_metrics_have_task_prefixed_keys_and_delta_m_only_with_a_baseline():
    g = torch.Generator().manual_seed(0)
    n, h, w = 2, 16, 16
    outputs = {"segmentation": torch.randn(n, 21, h, w, generator=g),
               "human_parts": torch.randn(n, 7, h, w, generator=g),
               "saliency": torch.randn(n, 1, h, w, generator=g), "normal": torch.randn(n, 3, h, w, generator=g),
               "edge": torch.randn(n, 1, h, w, generator=g)}
    batch = {"segmentation": torch.randint(-1, 21, (n, h, w), generator=g),
             "human_parts": torch.randint(-1, 7, (n, h, w), generator=g),
             "saliency": (torch.rand(n, 1, h, w, generator=g) > 0.5).float(),
             "normal": torch.nn.functional.normalize(torch.randn(n, 3, h, w, generator=g), dim=1),
             "edge": (torch.rand(n, 1, h, w, generator=g) > 0.9).float()}
    plain = metrics.BenchmarkMetrics("pascal")
    plain.update(outputs, batch)
    result = plain.compute()
    assert set(result) == {"seg_miou", "seg_pix_acc", "parts_miou", "parts_pix_acc", "sal_max_f", "sal_miou",
                           "normal_mean_angle", "normal_median_angle", "edge_ods_f"}
    assert 0 < result["seg_miou"] < 0.2 and 60 < result["normal_mean_angle"] < 120
    baseline = {"seg_miou": result["seg_miou"] * 2, "normal_mean_angle": result["normal_mean_angle"]}
    with_baseline = metrics.BenchmarkMetrics("pascal", baseline=baseline)
    with_baseline.update(outputs, batch)
    # seg mIoU at half its baseline: +50 %; normals equal to theirs: 0 -> Δm = 25 %.
    assert with_baseline.compute()["delta_m"] == pytest.approx(25.0)
    # Δm takes one metric per task (PASCAL_DELTA_KEYS): a full baseline's pixel accuracies, saliency mIoU and
    # median angle, here far from the results, do not count.
    full = {**baseline, "seg_pix_acc": result["seg_pix_acc"] * 4, "sal_miou": result["sal_miou"] * 5,
            "normal_median_angle": result["normal_median_angle"] / 3}
    with_full = metrics.BenchmarkMetrics("pascal", baseline=full)
    with_full.update(outputs, batch)
    assert with_full.compute()["delta_m"] == pytest.approx(25.0)
    nyu = metrics.BenchmarkMetrics("nyuv2")
    assert nyu.baseline == metrics.BASELINES["nyuv2"]


def test_check_baseline_refuses_what_delta_m_cannot_use_and_names_ignored_keys():
    assert metrics.metric_names("cityscapes") == ["miou", "pix_acc", "abs_err", "rel_err"]
    assert metrics.check_baseline("cityscapes", dict(metrics.BASELINES["cityscapes"])) == []
    with pytest.raises(ValueError, match=r"no key is a metric Δm of cityscapes uses: \['mIoU'\]"):
        metrics.check_baseline("cityscapes", {"mIoU": 0.7})
    with pytest.raises(ValueError, match="JSON object"):
        metrics.check_baseline("cityscapes", [0.7])
    with pytest.raises(ValueError, match=r"finite non-zero numbers .*\['abs_err', 'rel_err'\]"):
        metrics.check_baseline("cityscapes", {"miou": 0.7, "abs_err": 0, "rel_err": "27"})
    warnings = metrics.check_baseline("cityscapes", {"miou": 0.74, "my_metric": 1.0})
    assert any("['my_metric']" in w and "ignored" in w for w in warnings), warnings
    assert any("without ['pix_acc', 'abs_err', 'rel_err']" in w for w in warnings), warnings
    # PASCAL-Context: metrics outside the one-per-task convention are named as unused; none of it is an error.
    warnings = metrics.check_baseline("pascal", {"seg_miou": 0.6, "seg_pix_acc": 0.9})
    assert any("not used by Δm" in w and "['seg_pix_acc']" in w for w in warnings), warnings
    with pytest.raises(ValueError, match="no key is a metric Δm of pascal uses"):
        metrics.check_baseline("pascal", {"seg_pix_acc": 0.9, "miou": 0.6})


def test_binary_attributes_per_attribute_by_name_and_the_f1_of_an_absent_attribute():
    attrs = metrics.BinaryAttributes(4, names=("a", "b", "c", "d"))
    logits = torch.tensor([[2.0, -1.0, -1.0, 3.0], [1.0, -2.0, -1.0, -1.0], [-3.0, -1.0, -0.5, -1.0],
                           [0.5, -1.0, -2.0, -4.0]])
    target = torch.tensor([[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0]])
    for rows in (slice(0, 1), slice(1, 4)):          # the counts of the whole split decide
        attrs.update(logits[rows], target[rows])
    out = attrs.compute()
    # a: pred 1,1,0,1 vs 1,0,0,1: tp 2 fp 1 fn 0 tn 1 -> acc 3/4, F1 2·2 / (2·2 + 1) = 4/5.
    # b: never predicted, never present: tp = fp = fn = 0 -> acc 1, F1 1 (sklearn zero_division=1.0).
    # c: never predicted, present twice: tp 0 fn 2 tn 2 -> acc 1/2, F1 0 (2·0 / (0 + 0 + 2)).
    # d: predicted once, never present: fp 1 tn 3 -> acc 3/4, F1 0 (2·0 / (0 + 1 + 0)).
    expected = {"a_accuracy": 0.75, "a_f1": 0.8, "b_accuracy": 1.0, "b_f1": 1.0, "c_accuracy": 0.5, "c_f1": 0.0,
                "d_accuracy": 0.75, "d_f1": 0.0}
    assert list(out) == ["accuracy", "f1", *expected]
    assert out == pytest.approx({"accuracy": 3.0 / 4, "f1": 1.8 / 4, **expected})
    assert all(type(v) is float for v in out.values())
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        attrs.update(logits[:, :3], target[:, :3])
    with pytest.raises(ValueError, match="3 attribute names for 4"):
        metrics.BinaryAttributes(4, names=("a", "b", "c"))


def celeba_outputs(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, 40, generator=g) < 0.4).float()
    logits = torch.where(torch.rand(n, 40, generator=g) < 0.8, 2 * target - 1, 1 - 2 * target)
    return {f"attr{k:02d}": logits[:, k:k + 1] for k in range(40)}, {"attributes": target}


def test_celeba_reports_every_attribute_by_name_and_the_means_of_them():
    outputs, batch = celeba_outputs()
    m = metrics.BenchmarkMetrics("celeba")
    m.update(outputs, batch)
    out = m.compute()
    names = celeba_data.ATTRIBUTES
    assert list(out) == ["accuracy", "f1", *(f"{a}_{k}" for a in names for k in ("accuracy", "f1"))]
    assert metrics.metric_names("celeba") == list(out) and "delta_m" not in out
    assert out["accuracy"] == pytest.approx(np.mean([out[f"{a}_accuracy"] for a in names]))
    assert out["f1"] == pytest.approx(np.mean([out[f"{a}_f1"] for a in names]))
    logits, target = torch.cat(list(outputs.values()), 1) > 0, batch["attributes"].bool()
    k = names.index("Smiling")
    tp = int((logits[:, k] & target[:, k]).sum())
    fp, fn = int((logits[:, k] & ~target[:, k]).sum()), int((~logits[:, k] & target[:, k]).sum())
    assert out["Smiling_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert out["Smiling_accuracy"] == pytest.approx(float((logits[:, k] == target[:, k]).double().mean()))
    assert metrics.summary(out) == {"accuracy": out["accuracy"], "f1": out["f1"]}


def test_celeba_delta_m_over_the_means_or_per_attribute_never_both():
    outputs, batch = celeba_outputs()
    plain = metrics.BenchmarkMetrics("celeba")
    plain.update(outputs, batch)
    result = plain.compute()

    def delta(baseline):
        m = metrics.BenchmarkMetrics("celeba", baseline=baseline)
        m.update(outputs, batch)
        return m.compute()["delta_m"]

    # The two means, as before per-attribute metrics were reported: accuracy at 4/5 of its baseline -> +20 % / 2.
    means = {"accuracy": result["accuracy"] / 0.8, "f1": result["f1"]}
    assert delta(means) == pytest.approx(10.0)
    assert metrics.check_baseline("celeba", means) == []
    # Per-attribute F1 baselines (FAMO's): their mean; the means in the same file are not counted again.
    per_f1 = {f"{a}_f1": result[f"{a}_f1"] for a in celeba_data.ATTRIBUTES}
    per_f1["Smiling_f1"] = result["Smiling_f1"] / 0.5            # Smiling at half its baseline: +50 % / 40
    assert delta(per_f1) == pytest.approx(50 / 40)
    assert delta({**per_f1, **means}) == pytest.approx(50 / 40)
    warnings = metrics.check_baseline("celeba", {**per_f1, **means})
    assert len(warnings) == 1 and "not used by Δm" in warnings[0] and "['accuracy', 'f1']" in warnings[0], warnings
    assert metrics.check_baseline("celeba", per_f1) == []        # F1 alone is a complete per-attribute baseline
    del per_f1["Bald_f1"]
    assert metrics.check_baseline("celeba", per_f1) == ["Δm averages over the attributes the baseline has, "
                                                        "without ['Bald']"]
    with pytest.raises(ValueError, match="no key is a metric Δm of celeba uses.*Smiling_f1"):
        metrics.check_baseline("celeba", {"smiling_f1": 0.9})


def test_celeba_metrics_csv_has_one_column_per_attribute_metric(tmp_path):
    from tsbn_kernels.pipeline import train

    outputs, batch = celeba_outputs()
    history = []
    for epoch in (1, 2):
        m = metrics.BenchmarkMetrics("celeba", baseline={"accuracy": 0.9, "f1": 0.7})
        m.update(outputs, batch)
        history.append({"epoch": epoch, "step": epoch, "train_loss": {"attr00": 0.5}, "val": m.compute()})
    train.write_metrics(tmp_path, history)
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and len(rows[0]) == 2 + 1 + 2 + 80 + 1
    assert float(rows[1]["Bald_f1"]) == pytest.approx(history[1]["val"]["Bald_f1"])
    assert float(rows[0]["delta_m"]) == pytest.approx(history[0]["val"]["delta_m"])
    assert json.loads((tmp_path / "metrics.json").read_text())[0]["val"]["Young_accuracy"] == pytest.approx(
        history[0]["val"]["Young_accuracy"])


def test_a_metric_with_nothing_to_score_is_nan_not_a_perfect_or_zero_score():
    # A split without valid pixels for a task (no depth reading, no labelled pixel, no valid normal: PASCAL
    # normals_valid_classes on outdoor images) has no error to report; 0 would enter Δm as a −100 % "gain".
    depth = metrics.Depth()
    depth.update(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert all(math.isnan(v) for v in depth.compute().values())
    normals = metrics.Normals()
    normals.update(torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))
    out = normals.compute()
    assert set(out) == {"mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30"}
    assert all(math.isnan(v) for v in out.values())
    seg = metrics.Segmentation(3)
    seg.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), -1))
    assert all(math.isnan(v) for v in seg.compute().values())
    attrs = metrics.BinaryAttributes(2, names=("a", "b"))
    assert all(math.isnan(v) for v in attrs.compute().values())
    sal, edges = metrics.Saliency(), metrics.Edges()
    assert all(math.isnan(v) for v in [*sal.compute().values(), *edges.compute().values()])
    m = metrics.BenchmarkMetrics("nyuv2")
    m.update({"segmentation": torch.randn(1, 13, 2, 2), "depth": torch.ones(1, 1, 2, 2),
              "normal": torch.ones(1, 3, 2, 2)},
             {"segmentation": torch.zeros(1, 2, 2, dtype=torch.long), "depth": torch.zeros(1, 1, 2, 2),
              "normal": torch.zeros(1, 3, 2, 2)})
    result = m.compute()
    assert math.isnan(result["abs_err"]) and math.isnan(result["delta_m"]) and not math.isnan(result["miou"])


def test_depth_and_normals_hand_computed_over_batches_with_invalid_pixels():
    depth = metrics.Depth()
    depth.update(torch.tensor([[[[2.0, 5.0], [1.0, 0.5]]]]), torch.tensor([[[[1.0, 0.0], [2.0, 0.5]]]]))
    depth.update(torch.tensor([[[[3.0, 7.0]]]]), torch.tensor([[[[0.0, 4.0]]]]))
    # valid: |2−1|, |1−2|, |0.5−0.5|, |7−4| -> abs (1 + 1 + 0 + 3) / 4, rel (1 + 0.5 + 0 + 0.75) / 4
    assert depth.compute() == pytest.approx({"abs_err": 5 / 4, "rel_err": 2.25 / 4})
    normals = metrics.Normals()
    target = torch.tensor([[0.0, 0, 1], [0.0, 0, 1], [0.0, 0, 1], [0, 0, 0], [0.0, 0, 1]])
    angles = [5.0, 11.25, 29.0, 80.0, 60.0]         # 80° at the invalid pixel: not counted
    pred = torch.tensor([[math.sin(math.radians(a)), 0.0, math.cos(math.radians(a))] for a in angles])
    normals.update(pred.T.reshape(1, 3, 5, 1), target.T.reshape(1, 3, 5, 1))
    out = normals.compute()
    assert out["mean_angle"] == pytest.approx((5 + 11.25 + 29 + 60) / 4, abs=1e-6)
    assert out["median_angle"] == pytest.approx((11.25 + 29) / 2, abs=1e-3)
    # within t counts angles < t (11.25 itself is not within 11.25°, up to the acos rounding of 1e-13°)
    assert out["within_22.5"] == pytest.approx(2 / 4) and out["within_30"] == pytest.approx(3 / 4)
    assert out["within_11.25"] in (pytest.approx(1 / 4), pytest.approx(2 / 4))


def test_segmentation_refuses_predictions_outside_the_classes():
    seg = metrics.Segmentation(3)
    with pytest.raises(ValueError, match=r"predictions must lie in \[0, 3\)"):
        seg.update(torch.tensor([[0, 3]]), torch.tensor([[0, 1]]))   # 1·3 + 3 would count as (2, 0)
    seg.update(torch.tensor([[0, 7]]), torch.tensor([[0, -1]]))      # an ignored pixel's prediction is unused
    assert seg.compute() == {"miou": 1.0, "pix_acc": 1.0}
