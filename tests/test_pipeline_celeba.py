"""The CelebA loader on files written in the released layout by `tsbn-data synth celeba`."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tsbn_kernels.pipeline import celeba_data, data


def test_synth_and_load(tmp_path):
    assert data.main(["synth", "celeba", "--out", str(tmp_path), "--n", "20"]) == 0
    lines = (tmp_path / "list_attr_celeba.txt").read_text().splitlines()
    assert lines[0] == "20" and lines[1].split() == list(celeba_data.ATTRIBUTES) and len(lines) == 22
    train, val, test = (data.CelebA(tmp_path, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (16, 2, 2)
    item = train[3]
    assert item["image"].shape == (3, 64, 64) and 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["attributes"].shape == (40,) and set(item["attributes"].unique().tolist()) <= {0.0, 1.0}
    # Attributes are visible: where attribute k is on, its mark's colour sits at its place in the image.
    rng = np.random.default_rng(0)
    colours = torch.tensor(rng.integers(0, 256, size=(40, 3)), dtype=torch.float32) / 255
    items = [train[i] for i in range(len(train))]
    checked = 0
    for k in range(40):
        angle = 2 * np.pi * k / 40
        x, y = int((89 + 74 * np.cos(angle)) / 178 * 64), int((109 + 90 * np.sin(angle)) / 218 * 64)
        for it in items:
            if it["attributes"][k] == 1:
                assert (it["image"][:, y, x] - colours[k]).abs().max() < 0.12, (k, it["image"][:, y, x], colours[k])
                checked += 1
    assert checked > 100


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="list_attr_celeba.txt"):
        data.CelebA(tmp_path)
    celeba_data.synthesize(tmp_path, 5)
    ds = data.CelebA(tmp_path, "train")   # an image missing at construction: tests/test_pipeline_user_scenarios
    (tmp_path / "img_align_celeba" / "000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000002.jpg"):
        ds[1]
    (tmp_path / "img_align_celeba" / "000001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="corrupt CelebA image .*000001.jpg"):
        ds[0]
    text = (tmp_path / "list_attr_celeba.txt").read_text().replace(" -1", " 0", 1)
    (tmp_path / "list_attr_celeba.txt").write_text(text)
    with pytest.raises(ValueError, match="line 3"):
        data.CelebA(tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        data.CelebA(tmp_path, "validation")


@pytest.mark.parametrize("train,val", [(3, 2), (6, 4)])
def test_synthetic_split_sizes_are_the_asked_counts(tmp_path, train, val):
    # As tsbn-train --data synthetic asks for them: fractions of the total made from the counts.
    total = train + 2 * val
    celeba_data.synthesize(tmp_path, total, splits=(train / total, val / total, val / total))
    assert [len(data.CelebA(tmp_path, s, 16)) for s in ("train", "val", "test")] == [train, val, val]


def test_attributes_follow_the_names_of_line_2_not_the_column_order(tmp_path):
    celeba_data.synthesize(tmp_path, 6)
    expected = [item["attributes"] for item in data.CelebA(tmp_path, "train", 16)]
    path = tmp_path / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    order = list(range(40))[::-1]                       # the same table with its columns reversed
    rows = [line.split() for line in lines[2:]]
    lines[1] = " ".join(celeba_data.ATTRIBUTES[k] for k in order)
    lines[2:] = [" ".join([row[0]] + [row[1 + k] for k in order]) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    for item, attributes in zip(data.CelebA(tmp_path, "train", 16), expected):
        assert torch.equal(item["attributes"], attributes)
    lines[1] = lines[1].replace("Smiling", "Smiles")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 2 names \['Smiles'\].*missing \['Smiling'\]"):
        data.CelebA(tmp_path)


def test_a_non_square_size_is_height_by_width(tmp_path):
    celeba_data.synthesize(tmp_path, 5)
    assert data.CelebA(tmp_path, "train", (16, 24))[0]["image"].shape == (3, 16, 24)
    assert data.CelebA(tmp_path, "train", 20)[0]["image"].shape == (3, 20, 20)
