"""PASCAL-Context in the ASTMT PASCAL_MT layout: the loader on synthetic files of the real format and on
hand-built ones, the augmentation, and clear errors for missing or corrupt files."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from tsbn_kernels.pipeline import data, pascal_data


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return pascal_data.synthesize(tmp_path_factory.mktemp("pascal"), 8, seed=3, size=(48, 64))


def test_tsbn_data_writes_pascal(tmp_path, capsys):
    assert data.main(["synth", "pascal", "--out", str(tmp_path), "--n", "4", "--size", "32", "32"]) == 0
    assert len(pascal_data.PascalContext(tmp_path, "train", size=32)) == 3
    assert "wrote 4 pascal samples" in capsys.readouterr().out


@pytest.mark.parametrize("split,count", [("train", 6), ("val", 2)])
def test_items_have_the_declared_shapes_types_and_ranges(root, split, count):
    dataset = pascal_data.PascalContext(root, split, size=40)
    assert len(dataset) == count
    for item in dataset:
        assert set(item) == {"image", *pascal_data.TASKS}
        assert item["image"].shape == (3, 40, 40) and 0 <= item["image"].min() and item["image"].max() <= 1
        for key, classes in pascal_data.NUM_CLASSES.items():
            assert item[key].shape == (40, 40) and item[key].dtype == torch.long
            assert -1 <= item[key].min() and item[key].max() < classes
        for key in ("saliency", "edge"):
            assert item[key].shape == (1, 40, 40) and set(item[key].unique().tolist()) <= {0.0, 1.0}
        norms = item["normal"].norm(dim=0)
        assert item["normal"].shape == (3, 40, 40) and ((norms - 1).abs() < 0.02).all()   # every pixel valid
        fg = item["segmentation"] > 0
        assert torch.equal(item["saliency"][0].bool() & (item["segmentation"] >= 0), fg)


def test_segmentation_255_is_ignored_and_person_parts_are_decoded(root):
    dataset = pascal_data.PascalContext(root, "train", size=48)
    raw = np.asarray(Image.open(root / "semseg" / "pascal-context" / f"{dataset.ids[0]}.png"))
    assert (raw == 255).any()
    stored = dataset.load(0)
    torch.testing.assert_close(stored["segmentation"] == -1, torch.from_numpy(raw == 255))
    persons = [i for i in range(len(dataset)) if (dataset.load(i)["segmentation"] == pascal_data.PERSON).any()]
    others = [i for i in range(len(dataset)) if i not in persons]
    assert persons and others
    for i in persons:
        parts = dataset.load(i)["human_parts"]
        assert set(parts.unique().tolist()) == set(range(7))
        # Every part pixel is a person pixel, or the 255 outline VOC draws around the person.
        assert (dataset.load(i)["segmentation"][parts > 0] != 0).all()
    for i in others:
        assert (dataset.load(i)["human_parts"] == -1).all()


def write_sample(root, image_id, size=(6, 8), parts=None, label_map=None):
    """One hand-built PASCAL_MT sample with a known content."""
    h, w = size
    for folder in ("ImageSets/Context", "JPEGImages", "semseg/pascal-context", "human_parts",
                   "pascal-context/trainval", "normals_distill", "sal_distill"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Context" / "train.txt").write_text(image_id + "\n")
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
    Image.fromarray(np.arange(h * w, dtype=np.uint8).reshape(h, w) % 21).save(
        root / "semseg" / "pascal-context" / f"{image_id}.png")
    normal = np.zeros((h, w, 3), np.uint8)
    normal[..., 0], normal[..., 2] = 255, 0                       # decodes to (1, −1, −1)
    normal[..., 1] = 0
    Image.fromarray(normal).save(root / "normals_distill" / f"{image_id}.png")
    Image.fromarray(np.where(np.arange(w) < w // 2, 200, 10).astype(np.uint8)[None].repeat(h, 0)).save(
        root / "sal_distill" / f"{image_id}.png")
    if label_map is None:
        label_map = np.where(np.arange(w) < 3, 7, 9).astype(np.uint16)[None].repeat(h, 0)
    scipy.io.savemat(root / "pascal-context" / "trainval" / f"{image_id}.mat", {"LabelMap": label_map})
    objects = np.zeros((1, 1 if parts is None else 2),
                       dtype=[("class", object), ("classind", object), ("mask", object), ("parts", object)])
    objects[0, 0] = ("dog", np.array([[12]]), np.ones((h, w), np.uint8), np.zeros((0, 0)))
    if parts is not None:
        records = np.zeros((1, len(parts)), dtype=[("part_name", object), ("mask", object)])
        for k, (name, mask) in enumerate(parts.items()):
            records[0, k] = (name, mask.astype(np.uint8))
        objects[0, 1] = ("person", np.array([[15]]), np.ones((h, w), np.uint8), records)
    scipy.io.savemat(root / "human_parts" / f"{image_id}.mat", {"anno": {"imname": image_id, "objects": objects}})


def test_hand_built_sample_decodes_exactly(tmp_path):
    h, w = 6, 8
    hair, rfoot, rlarm = np.zeros((h, w), bool), np.zeros((h, w), bool), np.zeros((h, w), bool)
    hair[0, :2], rfoot[5, 6:], rlarm[2:4, 3] = True, True, True
    write_sample(tmp_path, "2010_000001", (h, w), parts={"hair": hair, "rfoot": rfoot, "rlarm": rlarm})
    dataset = pascal_data.PascalContext(tmp_path, "train", size=8, normals_valid_classes={9})
    stored = dataset.load(0)
    expected_parts = np.zeros((h, w), np.int64)
    expected_parts[hair], expected_parts[rfoot], expected_parts[rlarm] = 1, 6, 4
    assert torch.equal(stored["human_parts"], torch.from_numpy(expected_parts))
    # Normals decode as 2v/255 − 1; the pixels of LabelMap class 7 (columns < 3) are outside the valid classes.
    assert torch.equal(stored["normal"][:, :, 3:], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, h, w - 3))
    assert (stored["normal"][:, :, :3] == 0).all()
    assert torch.equal(stored["saliency"][0, 0], (torch.arange(w) < w // 2).float())
    item = pascal_data.PascalContext(tmp_path, "train", size=h)[0]          # square resize of a 6×8 map
    assert item["edge"].sum() > 0 and item["edge"].shape == (1, h, h)


def test_edges_are_the_label_map_boundaries():
    labels = torch.tensor([[4, 4, 7, 7], [4, 4, 7, 7], [4, 4, 4, 4]])
    expected = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]).float()
    assert torch.equal(pascal_data.label_boundaries(labels), expected)
    padded = torch.tensor([[4, 4, -1], [4, 4, -1]])
    assert pascal_data.label_boundaries(padded).sum() == 0      # padding makes no edge


def test_augmentation_is_reproducible_scales_and_flips(root):
    dataset = pascal_data.PascalContext(root, "train", size=48)
    stored = dataset.load(1)
    flips, scales = set(), set()
    for seed in range(12):
        first = pascal_data.PascalContext(root, "train", size=48, augment=True, seed=seed)[1]
        again = pascal_data.PascalContext(root, "train", size=48, augment=True, seed=seed)[1]
        assert all(torch.equal(first[k], again[k]) for k in first)
        g = pascal_data.sample_generator(seed, 0, 1)
        unflipped = pascal_data.random_scale_crop(dict(stored), 48, g)
        unflipped["edge"] = pascal_data.label_boundaries(unflipped.pop("label_map"))[None]
        flipped = pascal_data.horizontal_flip(unflipped)
        is_flipped = torch.equal(first["image"], flipped["image"])
        assert is_flipped or torch.equal(first["image"], unflipped["image"])
        expected = flipped if is_flipped else unflipped
        assert all(torch.equal(first[k], expected[k]) for k in first)
        flips.add(is_flipped)
        scales.add(bool((first["segmentation"] == -1).all(dim=0).any()))     # padded columns: scaled down
    assert flips == {True, False} and scales == {True, False}
    # The flip mirrors every map and negates the normal's x component.
    plain = dataset[1]
    mirrored = pascal_data.horizontal_flip(plain)
    torch.testing.assert_close(mirrored["normal"][0], -plain["normal"][0].flip(-1))
    torch.testing.assert_close(mirrored["normal"][1:], plain["normal"][1:].flip(-1))
    assert torch.equal(mirrored["human_parts"], plain["human_parts"].flip(-1))


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageSets/Context/train.txt"):
        pascal_data.PascalContext(tmp_path, "train")
    write_sample(tmp_path, "2010_000002")
    (tmp_path / "sal_distill" / "2010_000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="sal_distill/2010_000002.png"):
        pascal_data.PascalContext(tmp_path, "train")[0]
    write_sample(tmp_path, "2010_000002")
    (tmp_path / "normals_distill" / "2010_000002.png").write_text("not a png")
    with pytest.raises(ValueError, match="corrupt PASCAL-Context file .*normals_distill/2010_000002.png"):
        pascal_data.PascalContext(tmp_path, "train")[0]
    write_sample(tmp_path, "2010_000002")
    path = tmp_path / "human_parts" / "2010_000002.mat"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt PASCAL-Context file .*human_parts/2010_000002.mat"):
        pascal_data.PascalContext(tmp_path, "train")[0]
    write_sample(tmp_path, "2010_000002")
    scipy.io.savemat(tmp_path / "pascal-context" / "trainval" / "2010_000002.mat", {"Other": np.ones((6, 8))})
    with pytest.raises(ValueError, match="no variable 'LabelMap'"):
        pascal_data.PascalContext(tmp_path, "train")[0]
    (tmp_path / "ImageSets" / "Context" / "train.txt").write_text("\n")
    with pytest.raises(ValueError, match="names no image"):
        pascal_data.PascalContext(tmp_path, "train")
