"""CelebA in its released layout: a loader, and a generator of synthetic faces written in that layout.

    {root}/img_align_celeba/000001.jpg ...     aligned 178×218 RGB faces
    {root}/list_attr_celeba.txt                line 1: count; line 2: the 40 attribute names; then
                                               "000001.jpg  -1  1 ..." (±1 → 0/1)
    {root}/list_eval_partition.txt             "000001.jpg 0" (0 train, 1 val, 2 test)
Images are resized to 64×64 (DESIGN.md §5).
"""
from __future__ import annotations

import os
import pathlib

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .dense_data import image_size
from .errors import DatasetError

ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
SPLITS = {"train": 0, "val": 1, "test": 2}


def _read_lines(path: pathlib.Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"missing CelebA file {path}")
    return path.read_text().splitlines()


class CelebA(torch.utils.data.Dataset):
    """Items: {"image": [3, H, W] float in [0, 1], "attributes": [40] float 0/1 in ``ATTRIBUTES`` order}; ``size``
    is H×W, or an int for a square (the field's 64×64)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", size: int | tuple[int, int] = 64):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        self.root, self.size = pathlib.Path(root), image_size(size, "CelebA")
        attr_lines = _read_lines(self.root / "list_attr_celeba.txt")
        if len(attr_lines) < 2 or len(attr_lines[1].split()) != 40:
            raise DatasetError(f"corrupt CelebA file {self.root / 'list_attr_celeba.txt'}: line 2 must name the 40 "
                               "attributes")
        header = attr_lines[1].split()
        if sorted(header) != sorted(ATTRIBUTES):
            raise DatasetError(f"corrupt CelebA file {self.root / 'list_attr_celeba.txt'}: line 2 names "
                               f"{sorted(set(header) - set(ATTRIBUTES))}, not CelebA attributes; missing "
                               f"{sorted(set(ATTRIBUTES) - set(header))}")
        # Items hold the attributes in ATTRIBUTES order whatever the file's column order: head k and the metrics
        # named ATTRIBUTES[k] must mean the same attribute.
        columns = [1 + header.index(name) for name in ATTRIBUTES]
        attributes = {}
        for number, line in enumerate(attr_lines[2:], start=3):
            fields = line.split()
            if len(fields) != 41 or any(f not in ("1", "-1") for f in fields[1:]):
                raise DatasetError(f"corrupt CelebA file {self.root / 'list_attr_celeba.txt'} line {number}: "
                                   f"expected a file name and 40 values of ±1")
            attributes[fields[0]] = [int(fields[c]) > 0 for c in columns]
        partition = {}
        for number, line in enumerate(_read_lines(self.root / "list_eval_partition.txt"), start=1):
            fields = line.split()
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise DatasetError(f"corrupt CelebA file {self.root / 'list_eval_partition.txt'} line {number}")
            partition[fields[0]] = int(fields[1])
        self.files = sorted(f for f, p in partition.items() if p == SPLITS[split])
        if not self.files:   # training or scoring on nothing would give NaN metrics, not an error
            raise DatasetError(f"CelebA: {self.root / 'list_eval_partition.txt'} assigns no image to the {split} "
                               f"split ({SPLITS[split]})")
        missing = [f for f in self.files if f not in attributes]
        if missing:
            raise DatasetError(f"CelebA: {missing[0]} is in list_eval_partition.txt but not in list_attr_celeba.txt")
        # The split's images, checked here from one folder listing, not when a batch first reads them: a missing
        # validation image would otherwise end a run after its first training epoch.
        folder = self.root / "img_align_celeba"
        present = set(os.listdir(folder)) if folder.is_dir() else set()
        absent = [f for f in self.files if f not in present]
        if absent:
            more = f" (and {len(absent) - 1} more of the split's {len(self.files)})" if len(absent) > 1 else ""
            raise FileNotFoundError(f"missing CelebA image {folder / absent[0]}{more}")
        self.attributes = attributes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: int) -> dict[str, Tensor]:
        name = self.files[item]
        path = self.root / "img_align_celeba" / name
        if not path.exists():
            raise FileNotFoundError(f"missing CelebA image {path}")
        try:
            with Image.open(path) as img:
                img = img.convert("RGB").resize((self.size[1], self.size[0]), Image.BILINEAR)   # PIL: (W, H)
                pixels = np.asarray(img, dtype=np.float32) / 255.0
        except OSError as exc:
            raise DatasetError(f"corrupt CelebA image {path}: {exc}") from exc
        return {"image": torch.from_numpy(pixels).permute(2, 0, 1).contiguous(),
                "attributes": torch.tensor(self.attributes[name], dtype=torch.float32)}


def synthesize(root: str | os.PathLike, n: int, seed: int = 0, splits=(0.8, 0.1, 0.1)) -> pathlib.Path:
    """Write ``n`` synthetic aligned faces: a face ellipse on a background, and for each of the 40 attributes a
    visible mark of its own colour at its own place around the face, drawn iff the attribute is on."""
    root = pathlib.Path(root)
    (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(40, 3))
    angles = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    attr_lines = [str(n), " ".join(ATTRIBUTES)]
    # Integer split boundaries: fractions made from counts (3/7 of 7) must give those counts back, which
    # comparing i with the float product (2.9999…) does not.
    counts = [round(splits[0] * n), round((splits[0] + splits[1]) * n) - round(splits[0] * n)]
    counts.append(n - sum(counts))
    for k in range(3):   # a split asked for gets an image when n allows (n = 6 at 0.8/0.1/0.1 gave val none)
        if splits[k] > 0 and counts[k] == 0 and max(counts) > 1:
            counts[counts.index(max(counts))] -= 1
            counts[k] = 1
    train_end, val_end = counts[0], counts[0] + counts[1]
    partition_lines = []
    for i in range(1, n + 1):
        name = f"{i:06d}.jpg"
        attrs = rng.uniform(size=40) < 0.4
        img = Image.new("RGB", (178, 218), tuple(int(c) for c in rng.integers(60, 200, size=3)))
        draw = ImageDraw.Draw(img)
        skin = tuple(int(c) for c in rng.integers(150, 240, size=3))
        draw.ellipse((44, 54, 134, 164), fill=skin)
        for k in np.flatnonzero(attrs):
            x, y = 89 + 74 * np.cos(angles[k]), 109 + 90 * np.sin(angles[k])
            draw.rectangle((x - 5, y - 5, x + 5, y + 5), fill=tuple(int(c) for c in colours[k]))
        img.save(root / "img_align_celeba" / name, quality=95)
        attr_lines.append(name + " " + " ".join("1" if a else "-1" for a in attrs))
        split = 0 if i <= train_end else (1 if i <= val_end else 2)
        partition_lines.append(f"{name} {split}")
    (root / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(partition_lines) + "\n")
    return root
