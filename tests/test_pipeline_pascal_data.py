"""PASCAL-Context in the ASTMT PASCAL_MT layout: the loader on synthetic files of the real format and on
hand-built ones, the augmentation, and clear errors for missing or corrupt files."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from tsbn_kernels.pipeline import data, pascal_data
from tsbn_kernels.pipeline.dense_data import sample_generator

SEED, SIZE = 3, (48, 64)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return pascal_data.synthesize(tmp_path_factory.mktemp("pascal"), 8, seed=SEED, size=SIZE)


def test_synthesize_writes_the_layout_and_the_mat_structure(root):
    ids = [f"2008_{i:06d}" for i in range(1, 9)]
    assert (root / "ImageSets" / "Context" / "train.txt").read_text().split() == ids[:6]
    assert (root / "ImageSets" / "Context" / "val.txt").read_text().split() == ids[6:]
    for image_id in ids:
        for path in ("JPEGImages/{}.jpg", "semseg/pascal-context/{}.png", "human_parts/{}.mat",
                     "pascal-context/trainval/{}.mat", "normals_distill/{}.png", "sal_distill/{}.png"):
            assert (root / path.format(image_id)).is_file()
    with Image.open(root / "JPEGImages" / "2008_000001.jpg") as img:
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (SIZE[1], SIZE[0])
    with Image.open(root / "semseg" / "pascal-context" / "2008_000001.png") as img:
        assert img.mode in ("L", "P")
    # The nested struct/cell indexing of the real PASCAL-Part files, read back with scipy.io.loadmat.
    anno = scipy.io.loadmat(root / "human_parts" / "2008_000002.mat")["anno"]
    objects = anno[0][0][1][0]
    categories = [int(obj[1][0][0]) for obj in objects]
    assert pascal_data.PERSON in categories and len(set(categories)) == len(categories)
    person = objects[categories.index(pascal_data.PERSON)]
    assert person[2].shape == SIZE and person[2].any()
    names = [str(person[3][0][k][0][0]) for k in range(person[3].shape[1])]
    assert {"hair", "head", "neck", "torso", "luarm", "rlarm", "lhand", "ruleg", "llleg", "rfoot"} <= set(names)
    assert all(person[3][0][k][1].shape == SIZE for k in range(len(names)))
    assert all(objects[j][3].size == 0 for j in range(len(objects)) if categories[j] != pascal_data.PERSON)
    assert scipy.io.loadmat(root / "pascal-context" / "trainval" / "2008_000002.mat")["LabelMap"].shape == SIZE


def test_synthesize_is_fast_and_deterministic(tmp_path):
    import time
    start = time.perf_counter()
    pascal_data.synthesize(tmp_path / "a", 8, seed=1, size=(64, 64))
    assert time.perf_counter() - start < 2.0
    pascal_data.synthesize(tmp_path / "b", 8, seed=1, size=(64, 64))
    for path in sorted((tmp_path / "a").rglob("*.png")):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(tmp_path / "b" / path.relative_to(
            tmp_path / "a"))))


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
        assert item["image"].shape == (3, 40, 40) and item["image"].dtype == torch.float32
        assert 0 <= item["image"].min() and item["image"].max() <= 1 and item["image"].std() > 0.05
        for key, classes in pascal_data.NUM_CLASSES.items():
            assert item[key].shape == (40, 40) and item[key].dtype == torch.long
            assert -1 <= item[key].min() and item[key].max() < classes
        assert item["segmentation"].max() > 0                                   # never all background
        for key in ("saliency", "edge"):
            assert item[key].shape == (1, 40, 40) and item[key].dtype == torch.float32
            assert set(item[key].unique().tolist()) == {0.0, 1.0}
        norms = item["normal"].norm(dim=0)
        assert item["normal"].shape == (3, 40, 40) and ((norms - 1).abs() < 1e-4).all()   # every pixel valid
        assert item["normal"].std(dim=(1, 2)).max() > 0.05
        assert torch.equal(item["saliency"][0].bool() & (item["segmentation"] >= 0), item["segmentation"] > 0)


def test_round_trip_recovers_what_the_generator_drew(root):
    """At the stored resolution, every decoded map equals the generator's ground truth (synthetic_scene)."""
    with_person = without_person = 0
    for split in ("train", "val"):
        dataset = pascal_data.PascalContext(root, split, size=48)
        for item, image_id in enumerate(dataset.ids):
            truth = pascal_data.synthetic_scene(SEED, int(image_id.split("_")[1]) - 1, SIZE)
            stored = dataset.load(item)
            semseg = truth["semseg"].astype(np.int64)
            assert (semseg == 255).any() and (semseg > 0).any()
            semseg[semseg == 255] = -1
            assert torch.equal(stored["segmentation"], torch.from_numpy(semseg))
            assert torch.equal(stored["human_parts"], torch.from_numpy(truth["human_parts"]))
            assert torch.equal(stored["label_map"], torch.from_numpy(truth["label_map"].astype(np.int64)))
            assert torch.equal(stored["saliency"][0], torch.from_numpy(truth["saliency"] > 127).float())
            normal = torch.from_numpy(truth["normal"]).permute(2, 0, 1).float() * 2 / 255 - 1
            torch.testing.assert_close(stored["normal"], normal, rtol=0, atol=1e-6)
            assert normal.std(dim=(1, 2)).max() > 0.05
            jpeg_error = (stored["image"] - torch.from_numpy(truth["image"]).permute(2, 0, 1) / 255).abs().mean()
            assert jpeg_error < 0.03
            if (truth["human_parts"] >= 0).any():
                with_person += 1
                assert set(stored["human_parts"].unique().tolist()) == set(range(7))
                # the parts are the person's pixels: the LabelMap's person label
                assert torch.equal(stored["human_parts"] > 0, stored["label_map"] == pascal_data.CONTEXT_IDS[15])
                # each part class has its own visible shade (the mean brightness follows PART_SHADES)
                grey = stored["image"].mean(0)
                means = {c: grey[stored["human_parts"] == c].mean().item() for c in range(1, 7)}
                order = sorted(range(1, 7), key=means.get)
                assert order == sorted(range(1, 7), key=pascal_data.PART_SHADES.get)
            else:
                without_person += 1
                assert (stored["human_parts"] == -1).all()                        # no person: all ignored
                assert (dataset[item]["human_parts"] == -1).all()
    assert with_person >= 2 and without_person >= 2


def write_sample(root, image_id, size=(6, 8), parts=None, label_map=None, semseg=None, split="train"):
    """One hand-built PASCAL_MT sample with a known content (appended to the split list)."""
    h, w = size
    for folder in pascal_data.FOLDERS:
        (root / folder).mkdir(parents=True, exist_ok=True)
    listing = root / "ImageSets" / "Context" / f"{split}.txt"
    known = listing.read_text().split() if listing.exists() else []
    listing.write_text("".join(f"{i}\n" for i in dict.fromkeys(known + [image_id])))
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
    if semseg is None:
        semseg = (np.arange(h * w, dtype=np.uint8).reshape(h, w) % 21)
    Image.fromarray(semseg).save(root / "semseg" / "pascal-context" / f"{image_id}.png")
    normal = np.zeros((h, w, 3), np.uint8)
    normal[..., 0], normal[..., 1], normal[..., 2] = 255, 64, 0          # decodes to (1, 2·64/255 − 1, −1)
    Image.fromarray(normal).save(root / "normals_distill" / f"{image_id}.png")
    Image.fromarray(np.where(np.arange(w) < w // 2, 200, 10).astype(np.uint8)[None].repeat(h, 0)).save(
        root / "sal_distill" / f"{image_id}.png")
    if label_map is None:
        label_map = np.where(np.arange(w) < 3, 7, 9).astype(np.uint16)[None].repeat(h, 0)
    scipy.io.savemat(root / "pascal-context" / "trainval" / f"{image_id}.mat", {"LabelMap": label_map})
    persons = [] if parts is None else (parts if isinstance(parts, list) else [parts])
    objects = np.zeros((1, 1 + len(persons)),
                       dtype=[("class", object), ("class_ind", object), ("mask", object), ("parts", object)])
    objects[0, 0] = ("dog", np.array([[12]]), np.ones((h, w), np.uint8), np.zeros((0, 0)))
    for j, person in enumerate(persons):
        records = np.zeros((0, 0))
        if person:
            records = np.zeros((1, len(person)), dtype=[("part_name", object), ("mask", object)])
            for k, (name, mask) in enumerate(person.items()):
                records[0, k] = (name, mask.astype(np.uint8))
        objects[0, 1 + j] = ("person", np.array([[15]]), np.ones((h, w), np.uint8), records)
    scipy.io.savemat(root / "human_parts" / f"{image_id}.mat", {"anno": {"imname": image_id, "objects": objects}})


def test_every_part_name_maps_to_its_class(tmp_path):
    expected = {"hair": 1, "head": 1, "lear": 1, "lebrow": 1, "leye": 1, "mouth": 1, "nose": 1, "rear": 1,
                "rebrow": 1, "reye": 1, "neck": 2, "torso": 2, "luarm": 3, "ruarm": 3, "lhand": 4, "llarm": 4,
                "rhand": 4, "rlarm": 4, "luleg": 5, "ruleg": 5, "lfoot": 6, "llleg": 6, "rfoot": 6, "rlleg": 6}
    h, w = 5, 5                                   # pixel k (row-major) carries part k; pixel 24 is background
    masks = {}
    for k, name in enumerate(expected):
        masks[name] = np.zeros((h, w), bool)
        masks[name].flat[k] = True
    write_sample(tmp_path, "2010_000001", (h, w), parts=masks)
    stored = pascal_data.PascalContext(tmp_path, "train").load(0)["human_parts"]
    assert stored.flatten().tolist() == list(expected.values()) + [0]


def test_parts_of_several_persons_and_a_person_without_parts(tmp_path):
    h, w = 6, 8
    hair, rfoot, rlarm = np.zeros((h, w), bool), np.zeros((h, w), bool), np.zeros((h, w), bool)
    hair[0, :2], rfoot[5, 6:], rlarm[2:4, 3] = True, True, True
    write_sample(tmp_path, "2010_000001", (h, w), parts=[{"hair": hair}, {}, {"rfoot": rfoot, "rlarm": rlarm}])
    write_sample(tmp_path, "2010_000002", (h, w), parts=[{}])       # a person without annotated parts
    write_sample(tmp_path, "2010_000003", (h, w))                   # no person at all
    dataset = pascal_data.PascalContext(tmp_path, "train", size=8)
    expected = np.zeros((h, w), np.int64)
    expected[hair], expected[rfoot], expected[rlarm] = 1, 6, 4
    assert torch.equal(dataset.load(0)["human_parts"], torch.from_numpy(expected))
    for item in (1, 2):
        assert (dataset.load(item)["human_parts"] == -1).all()
        assert (dataset[item]["human_parts"] == -1).all()


def test_semseg_255_is_ignored_and_voc12_is_preferred(tmp_path):
    h, w = 6, 8
    semseg = np.zeros((h, w), np.uint8)
    semseg[1:4, 2:6], semseg[1, 2:6], semseg[5, :] = 12, 255, 20
    write_sample(tmp_path, "2010_000001", (h, w), semseg=semseg)
    dataset = pascal_data.PascalContext(tmp_path, "train", size=8)
    expected = torch.from_numpy(semseg.astype(np.int64))
    expected[expected == 255] = -1
    assert torch.equal(dataset.load(0)["segmentation"], expected)
    # a palette PNG (the VOC format) under semseg/VOC12 is read instead, as its indices
    (tmp_path / "semseg" / "VOC12").mkdir(parents=True)
    indices = np.where(semseg == 12, 3, semseg).astype(np.uint8)
    voc = Image.new("P", (w, h))
    voc.putpalette([c for i in range(256) for c in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    voc.putdata(indices.flatten().tolist())
    voc.save(tmp_path / "semseg" / "VOC12" / "2010_000001.png")
    expected[expected == 12] = 3
    assert torch.equal(dataset.load(0)["segmentation"], expected)
    item = dataset[0]                                                        # 8×8: only the rows are resized
    assert set(item["segmentation"].unique().tolist()) == {-1, 0, 3, 20}


def test_normals_decode_and_invalid_classes_are_zero(tmp_path):
    h, w = 6, 8
    write_sample(tmp_path, "2010_000001", (h, w))                 # LabelMap: 7 in columns < 3, 9 elsewhere
    stored = pascal_data.PascalContext(tmp_path, "train", normals_valid_classes={9}).load(0)
    decoded = torch.tensor([1.0, 2 * 64 / 255 - 1, -1.0]).view(3, 1, 1).expand(3, h, w - 3)
    assert torch.allclose(stored["normal"][:, :, 3:], decoded)
    assert (stored["normal"][:, :, :3] == 0).all()
    assert torch.equal(stored["saliency"][0, 0], (torch.arange(w) < w // 2).float())
    # resized (6×8 → 16×16, bilinear): valid pixels are unit vectors along the decoded direction, invalid stay 0
    item = pascal_data.PascalContext(tmp_path, "train", size=16, normals_valid_classes={9})[0]
    valid = item["normal"].abs().sum(0) > 0
    assert valid[:, 6:].all() and not valid[:, :6].any()
    torch.testing.assert_close(item["normal"][:, valid].norm(dim=0), torch.ones(int(valid.sum())))
    direction = decoded[:, 0, 0] / decoded[:, 0, 0].norm()
    torch.testing.assert_close(item["normal"][:, valid], direction[:, None].expand(3, int(valid.sum())))
    assert (pascal_data.PascalContext(tmp_path, "train", size=16)[0]["normal"].norm(dim=0) > 0.99).all()


def test_resize_normals_renormalises_the_bilinear_average():
    normal = torch.zeros(3, 2, 2)
    normal[:, 0, 0], normal[:, 0, 1] = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])   # bottom row invalid
    resized = pascal_data.resize_normals(normal, (4, 4))
    assert (resized[:, 2:] == 0).all()
    torch.testing.assert_close(resized[:, :2].norm(dim=0), torch.ones(2, 4))
    torch.testing.assert_close(resized[:, 0, 1], torch.nn.functional.normalize(torch.tensor([0.75, 0.25, 0]), dim=0))


def test_edges_are_the_label_map_boundaries(tmp_path):
    labels = torch.tensor([[4, 4, 7, 7], [4, 4, 7, 7], [4, 4, 4, 4]])
    expected = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]).float()
    assert torch.equal(pascal_data.label_boundaries(labels), expected)
    assert pascal_data.label_boundaries(torch.tensor([[4, 4, -1], [4, 4, -1]])).sum() == 0   # padding: no edge
    # a hand-built 2-region LabelMap (columns < 3: 7, the rest: 9) at its own size: the edge is columns 2 and 3
    label_map = np.where(np.arange(8) < 3, 7, 9).astype(np.uint16)[None].repeat(8, 0)
    write_sample(tmp_path, "2010_000001", (8, 8), label_map=label_map)
    edge = pascal_data.PascalContext(tmp_path, "train", size=8)[0]["edge"]
    assert torch.equal(edge[0], ((torch.arange(8) == 2) | (torch.arange(8) == 3)).float().expand(8, 8))
    # resized to 16×16 (nearest), the boundary stays one pixel on each side of the region change
    edge = pascal_data.PascalContext(tmp_path, "train", size=16)[0]["edge"]
    assert torch.equal(edge[0], ((torch.arange(16) == 5) | (torch.arange(16) == 6)).float().expand(16, 16))


def test_synthetic_edges_outline_the_objects(root):
    item = pascal_data.PascalContext(root, "train", size=48)[0]
    seg = item["segmentation"]
    # every object outline (object pixels next to background, the 255 band) lies on or next to an edge
    near_edge = torch.nn.functional.max_pool2d(item["edge"][None], 3, 1, 1)[0, 0] > 0
    assert near_edge[seg == -1].float().mean() > 0.95
    assert 0.01 < item["edge"].mean() < 0.4


def test_augmentation_is_reproducible_scales_pads_and_flips(root):
    def run(seed, items=(0, 1, 2, 3, 1)):
        dataset = pascal_data.PascalContext(root, "train", size=48, augment=True, seed=seed)
        return [dataset[i] for i in items]

    first, again, other = run(5), run(5), run(6)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again) for k in a)
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(first, other))
    assert all(torch.equal(first[1][k], first[4][k]) for k in first[1])   # a function of (seed, epoch, i)
    # Replaying the documented draws (scale/offsets, then the flip) from sample_generator gives the same item.
    dataset = pascal_data.PascalContext(root, "train", size=48)
    flips, padded = set(), 0
    for seed in range(16):
        item = pascal_data.PascalContext(root, "train", size=48, augment=True, seed=seed)[1]
        g = sample_generator(seed, 0, 1)
        expected = pascal_data.random_scale_crop(dataset.load(1), 48, g)
        flip = bool(torch.rand(1, generator=g) < 0.5)
        if flip:
            expected = pascal_data.horizontal_flip(expected)
        expected["edge"] = pascal_data.label_boundaries(expected.pop("label_map"))[None]
        assert all(torch.equal(item[k], expected[k]) for k in item)
        flips.add(flip)
        pad = (item["human_parts"] == -1) & (item["segmentation"] == -1) & (item["image"] == 0).all(0)
        pad_columns = pad.all(dim=0)
        if pad_columns.any():                                        # scaled down: a padded band
            padded += 1
            assert (item["normal"][:, :, pad_columns] == 0).all() and (item["saliency"][..., pad_columns] == 0).all()
            assert (item["edge"][..., pad_columns] == 0).all()
    assert flips == {True, False} and 0 < padded < 16
    # The flip mirrors every map and negates the normal's x component.
    plain = dataset[1]
    mirrored = pascal_data.horizontal_flip(plain)
    assert plain["normal"][0].abs().max() > 0.1
    torch.testing.assert_close(mirrored["normal"][0], -plain["normal"][0].flip(-1))
    torch.testing.assert_close(mirrored["normal"][1:], plain["normal"][1:].flip(-1))
    assert torch.equal(mirrored["human_parts"], plain["human_parts"].flip(-1))
    # The loading order does not matter; the epoch does.
    by_seed = pascal_data.PascalContext(root, "train", size=48, augment=True, seed=2)
    a, b = by_seed[3], (by_seed[0], by_seed[3])[1]
    assert all(torch.equal(a[k], b[k]) for k in a)
    by_seed.set_epoch(1)
    assert not all(torch.equal(a[k], by_seed[3][k]) for k in a)


def test_a_non_square_size_gives_height_by_width_items_cropped_and_padded_per_axis(root):
    height, width = 32, 56                                 # not the stored 48×64 aspect, not square
    plain = pascal_data.PascalContext(root, "val", size=(height, width))
    stored = plain.load(0)
    item = plain[0]
    shapes = {k: tuple(v.shape) for k, v in item.items()}
    assert shapes == {"image": (3, height, width), "segmentation": (height, width), "human_parts": (height, width),
                      "saliency": (1, height, width), "normal": (3, height, width), "edge": (1, height, width)}
    for key in ("image", "segmentation", "normal"):             # the stored map stretched to H×W, nothing cut
        assert torch.equal(item[key], pascal_data._resize(key, stored[key], (height, width)))
    crops = pads = 0
    for seed in range(12):
        augmented = pascal_data.PascalContext(root, "val", size=(height, width), augment=True, seed=seed)[0]
        assert {k: tuple(v.shape) for k, v in augmented.items()} == shapes
        # The documented draws replayed: scale s, then the offsets of the window (s > 1) or of the placement.
        g = sample_generator(seed, 0, 0)
        scale = 0.75 + 0.5 * float(torch.rand(1, generator=g))
        scaled = (round(height * scale), round(width * scale))
        top = left = 0
        if scaled != (height, width):                                  # no offsets drawn at the output size
            top = int(torch.randint(abs(scaled[0] - height) + 1, (1,), generator=g))
            left = int(torch.randint(abs(scaled[1] - width) + 1, (1,), generator=g))
        flip = bool(torch.rand(1, generator=g) < 0.5)
        seg = pascal_data._resize("segmentation", stored["segmentation"], scaled)
        if scaled[0] >= height and scaled[1] >= width:
            expected = seg[top:top + height, left:left + width]
            crops += 1
        else:
            assert scaled[0] <= height and scaled[1] <= width
            expected = torch.full((height, width), -1)
            expected[top:top + scaled[0], left:left + scaled[1]] = seg
            pads += 1
        assert torch.equal(augmented["segmentation"], expected.flip(-1) if flip else expected)
    assert crops and pads


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageSets/Context/train.txt"):
        pascal_data.PascalContext(tmp_path, "train")
    for folder, suffix in (("JPEGImages", "jpg"), ("semseg/pascal-context", "png"), ("human_parts", "mat"),
                           ("pascal-context/trainval", "mat"), ("normals_distill", "png"), ("sal_distill", "png")):
        write_sample(tmp_path, "2010_000002")
        (tmp_path / folder / f"2010_000002.{suffix}").unlink()
        with pytest.raises(FileNotFoundError, match=f"{folder}/2010_000002.{suffix}"):
            pascal_data.PascalContext(tmp_path, "train")[0]
    for folder in ("JPEGImages/2010_000002.jpg", "normals_distill/2010_000002.png", "sal_distill/2010_000002.png",
                   "semseg/pascal-context/2010_000002.png"):
        write_sample(tmp_path, "2010_000002")
        (tmp_path / folder).write_text("not an image")
        with pytest.raises(ValueError, match=f"corrupt PASCAL-Context file .*{folder}"):
            pascal_data.PascalContext(tmp_path, "train")[0]
    for folder in ("human_parts", "pascal-context/trainval"):
        for cut in (0, 10, 100, 200):
            write_sample(tmp_path, "2010_000002")
            path = tmp_path / folder / "2010_000002.mat"
            path.write_bytes(path.read_bytes()[:cut])
            with pytest.raises(ValueError, match=f"corrupt PASCAL-Context file .*{folder}/2010_000002.mat"):
                pascal_data.PascalContext(tmp_path, "train")[0]
    write_sample(tmp_path, "2010_000002")
    path = tmp_path / "JPEGImages" / "2010_000002.jpg"
    path.write_bytes(path.read_bytes()[:200])                                  # a truncated JPEG
    with pytest.raises(ValueError, match="JPEGImages/2010_000002.jpg"):
        pascal_data.PascalContext(tmp_path, "train")[0]
    write_sample(tmp_path, "2010_000002")
    scipy.io.savemat(tmp_path / "pascal-context" / "trainval" / "2010_000002.mat", {"Other": np.ones((6, 8))})
    with pytest.raises(ValueError, match="no variable 'LabelMap'"):
        pascal_data.PascalContext(tmp_path, "train")[0]
    write_sample(tmp_path, "2010_000002")
    scipy.io.savemat(tmp_path / "human_parts" / "2010_000002.mat", {"anno": np.ones((1, 1))})
    with pytest.raises(ValueError, match="human_parts/2010_000002.mat: not the PASCAL-Part anno structure"):
        pascal_data.PascalContext(tmp_path, "train")[0]
    write_sample(tmp_path, "2010_000002", parts={"tail": np.ones((6, 8), bool)})
    with pytest.raises(ValueError, match="human_parts/2010_000002.mat.*unknown human part name 'tail'"):
        pascal_data.PascalContext(tmp_path, "train")[0]
    write_sample(tmp_path, "2010_000002", semseg=np.full((6, 8), 30, np.uint8))
    with pytest.raises(ValueError, match="semseg/pascal-context/2010_000002.png: value 30"):
        pascal_data.PascalContext(tmp_path, "train")[0]
    write_sample(tmp_path, "2010_000002")
    Image.fromarray(np.full((5, 8), 200, np.uint8)).save(tmp_path / "sal_distill" / "2010_000002.png")
    with pytest.raises(ValueError, match="sal_distill/2010_000002.png is 5×8"):
        pascal_data.PascalContext(tmp_path, "train")[0]
    (tmp_path / "ImageSets" / "Context" / "train.txt").write_text("\n")
    with pytest.raises(ValueError, match="names no image"):
        pascal_data.PascalContext(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="ImageSets/Context/val.txt"):
        pascal_data.PascalContext(tmp_path, "val")
