"""The NYUv2 / Cityscapes loaders on files written in the real format by `tsbn-data synth`."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tsbn_kernels.pipeline import data, dense_data


@pytest.mark.parametrize("dataset,tasks", [("nyuv2", {"image", "segmentation", "depth", "normal"}),
                                             ("cityscapes", {"image", "segmentation", "depth"})])
def test_synth_writes_the_real_format_and_the_loader_reads_it(dataset, tasks, tmp_path, capsys):
    assert data.main(["synth", dataset, "--out", str(tmp_path), "--n", "3", "--size", "24", "32",
                      "--split", "train"]) == 0
    assert not (tmp_path / "val").exists()
    spec = dense_data.SPECS[dataset]
    assert np.load(tmp_path / "train" / spec.folders["segmentation"] / "0.npy").shape == (24, 32)
    assert np.load(tmp_path / "train" / "image" / "2.npy").shape == (24, 32, 3)
    ds = data.DenseDataset(dataset, tmp_path, "train")
    assert len(ds) == 3
    item = ds[1]
    assert set(item) == tasks
    assert item["image"].shape == (3, 24, 32) and item["image"].min() >= 0 and item["image"].max() <= 1
    seg = item["segmentation"]
    assert seg.dtype == torch.long and seg.min() >= -1 and seg.max() < spec.num_classes and (seg == -1).any()
    assert (item["depth"] == 0).any() and (item["depth"] > 0).any()
    if "normal" in item:
        norms = item["normal"].norm(dim=0)
        valid = norms > 0
        torch.testing.assert_close(norms[valid], torch.ones_like(norms[valid]), rtol=1e-5, atol=1e-5)
        assert torch.equal(valid, item["depth"][0] > 0)


@pytest.mark.parametrize("dataset", ["nyuv2", "cityscapes"])
def test_synth_fills_both_splits_by_default(dataset, tmp_path, capsys):
    """`tsbn-data synth DATASET --n N`: a quarter of N (at least one) in val, the rest in train, from other seeds,
    so that `tsbn-train --data` finds the validation split it reads."""
    assert data.main(["synth", dataset, "--out", str(tmp_path), "--n", "5", "--size", "8", "16"]) == 0
    assert "wrote 4 train and 1 val" in capsys.readouterr().out
    train, val = data.DenseDataset(dataset, tmp_path, "train"), data.DenseDataset(dataset, tmp_path, "val")
    assert (len(train), len(val)) == (4, 1)
    assert not torch.equal(train[0]["image"], val[0]["image"])
    with pytest.raises(SystemExit):
        data.main(["synth", dataset, "--out", str(tmp_path / "one"), "--n", "1"])
    assert "--n must be at least 2 to fill both splits" in capsys.readouterr().err


def test_default_size_is_the_benchmark_size(tmp_path):
    dense_data.synthesize("cityscapes", tmp_path, 1)
    assert np.load(tmp_path / "train" / "image" / "0.npy").shape == (128, 256, 3)


def test_augmentation_scales_depth_and_flips_normals(tmp_path):
    dense_data.synthesize("nyuv2", tmp_path, 1, size=(30, 40))
    plain = data.DenseDataset("nyuv2", tmp_path)[0]
    seen_scales, seen_flip = set(), False
    for seed in range(12):
        out = data.DenseDataset("nyuv2", tmp_path, augment=True, seed=seed)[0]
        assert out["image"].shape == (3, 30, 40) and out["segmentation"].dtype == torch.long
        valid = out["depth"] > 0
        # Depth values are original values divided by the crop's scale.
        ratio = plain["depth"][plain["depth"] > 0].max() / out["depth"][valid].max()
        scale = min((1.0, 1.2, 1.5), key=lambda s: abs(s - ratio.item()))
        seen_scales.add(scale)
        assert set(out["segmentation"].unique().tolist()) <= set(plain["segmentation"].unique().tolist())
        if scale == 1.0 and torch.equal(out["segmentation"], plain["segmentation"].flip(-1)):
            seen_flip = True
            torch.testing.assert_close(out["normal"][0], -plain["normal"][0].flip(-1))
            torch.testing.assert_close(out["normal"][1:], plain["normal"][1:].flip(-1))
    assert len(seen_scales) >= 2 and seen_flip


@pytest.mark.parametrize("dataset,power", [("cityscapes", 1), ("nyuv2", -1)])
def test_augmentation_divides_depth_and_multiplies_disparity_by_the_zoom(tmp_path, dataset, power):
    # Zooming in by s brings the scene s times closer: depth / s (NYUv2), disparity (∝ 1 / depth) × s (Cityscapes).
    dense_data.synthesize(dataset, tmp_path, 1, size=(30, 40))
    np.save(tmp_path / "train" / "depth" / "0.npy", np.full((30, 40, 1), 0.5, dtype=np.float32))
    seen = set()
    for seed in range(12):
        out = data.DenseDataset(dataset, tmp_path, augment=True, seed=seed)[0]["depth"]
        scale = (out.unique().item() / 0.5) ** power
        assert any(abs(scale - s) < 1e-6 for s in (1.0, 1.2, 1.5)), scale
        seen.add(round(scale, 3))
    assert seen - {1.0}


def test_hidden_files_are_skipped_and_foreign_names_refused(tmp_path):
    dense_data.synthesize("cityscapes", tmp_path, 2, size=(8, 8))
    image = tmp_path / "train" / "image"
    (image / "._0.npy").write_bytes((image / "0.npy").read_bytes())    # macOS AppleDouble next to 0.npy
    assert len(data.DenseDataset("cityscapes", tmp_path)) == 2
    (image / "0 copy.npy").write_bytes((image / "0.npy").read_bytes())
    with pytest.raises(ValueError, match=r"image/0 copy\.npy is not named \{i\}\.npy"):
        data.DenseDataset("cityscapes", tmp_path)


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    dense_data.synthesize("cityscapes", tmp_path, 3, size=(24, 32))
    dataset = data.DenseDataset("cityscapes", tmp_path, augment=True, seed=5)
    dataset.set_epoch(2)
    forward = [dataset[i]["image"] for i in range(3)]
    backward = [dataset[i]["image"] for i in reversed(range(3))][::-1]     # loading order does not matter
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    dataset.set_epoch(3)
    assert any(not torch.equal(a, dataset[i]["image"]) for i, a in enumerate(forward))


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image folder"):
        data.DenseDataset("nyuv2", tmp_path)
    dense_data.synthesize("nyuv2", tmp_path, 2, size=(8, 8))
    ds = data.DenseDataset("nyuv2", tmp_path)   # a file missing at construction: tests/test_pipeline_user_scenarios
    (tmp_path / "train" / "depth" / "1.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing data file .*depth/1\.npy"):
        ds[1]
    (tmp_path / "train" / "normal" / "0.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"corrupt data file .*normal/0\.npy"):
        ds[0]
    np.save(tmp_path / "train" / "label" / "0.npy", np.zeros((8, 8, 2)))
    with pytest.raises(ValueError, match="label/0.npy has shape"):
        ds[0]
