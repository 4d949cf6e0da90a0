"""NYUv2 and Cityscapes in the MTAN preprocessing (DESIGN.md §5): loaders of the real on-disk format, the field's
augmentation, and a synthetic scene generator that writes that same format.

    {root}/{train,val}/image/{i}.npy    (H, W, 3) float in [0, 1]
    NYUv2:      label/{i}.npy (H, W) −1..12, depth/{i}.npy (H, W, 1) 0 = invalid, normal/{i}.npy (H, W, 3) 0 = invalid
    Cityscapes: label_7/{i}.npy (H, W) −1..6, depth/{i}.npy (H, W, 1) disparity, 0 = invalid
"""
from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DatasetError


@dataclass(frozen=True)
class DenseSpec:
    name: str
    size: tuple[int, int]
    num_classes: int
    folders: dict[str, str]          # task -> folder name
    splits: dict[str, int]           # published split sizes
    disparity: bool = False          # the "depth" folder holds disparity (∝ 1 / depth), as Cityscapes' does


NYUV2 = DenseSpec("nyuv2", (288, 384), 13, {"image": "image", "segmentation": "label", "depth": "depth",
                                             "normal": "normal"}, {"train": 795, "val": 654})
CITYSCAPES = DenseSpec("cityscapes", (128, 256), 7, {"image": "image", "segmentation": "label_7", "depth": "depth"},
                       {"train": 2975, "val": 500}, disparity=True)
SPECS = {"nyuv2": NYUV2, "cityscapes": CITYSCAPES}


def _load(path: pathlib.Path, shape_tail: tuple[int, ...] | None) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"missing data file {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetError(f"corrupt data file {path}: {exc}") from exc
    if shape_tail is not None and tuple(array.shape[2:]) != shape_tail:
        expected = "".join(f", {s}" for s in shape_tail)
        raise DatasetError(f"data file {path} has shape {array.shape}, expected (H, W{expected})")
    return array


class DenseDataset(torch.utils.data.Dataset):
    """One split of NYUv2 or Cityscapes. Items are dicts of tensors: image [3, H, W] float, segmentation
    [H, W] long (−1 ignore), depth [1, H, W] (0 invalid), and for NYUv2 normal [3, H, W] (0 invalid).

    ``augment=True`` applies the MTAN/LibMTL augmentation: a random scale s ∈ {1, 1.2, 1.5} crop resized back
    to full size (labels by nearest neighbour) and a horizontal flip (normal x negated). Zooming in by s shows
    the scene as if s times closer: depth is divided by s, Cityscapes' disparity multiplied by s (LibMTL divides
    both).

    Files of image/ whose names are not ``{i}.npy`` are refused by name; hidden ones (macOS ``._0.npy``
    AppleDouble files left by unpacking an archive) are skipped.
    The draws of sample i are a function of (seed, epoch, i) alone — see ``sample_generator`` — so they do not
    depend on the loading order, the number of DataLoader workers or of DDP ranks."""

    def __init__(self, spec: DenseSpec | str, root: str | os.PathLike, split: str = "train", augment: bool = False,
                 seed: int = 0):
        self.spec = SPECS[spec] if isinstance(spec, str) else spec
        self.dir = pathlib.Path(root) / split
        image_dir = self.dir / self.spec.folders["image"]
        if not image_dir.is_dir():
            raise FileNotFoundError(f"{self.spec.name}: no image folder {image_dir} (expected the MTAN layout "
                                    f"{{root}}/{{train,val}}/{{{','.join(self.spec.folders.values())}}}/{{i}}.npy)")
        files = [p for p in image_dir.glob("*.npy") if not p.name.startswith(".")]
        foreign = [p for p in files if not p.stem.isdigit()]
        if foreign:
            raise DatasetError(f"{self.spec.name}: {foreign[0]} is not named {{i}}.npy (an integer index) as the "
                               "MTAN layout's files are; move it out of the data folder")
        self.indices = sorted(int(p.stem) for p in files)
        if not self.indices:
            raise FileNotFoundError(f"{self.spec.name}: {image_dir} holds no .npy files")
        # Every task's file of every sample, checked here by listing the folders (cheap), not when a batch first
        # reads it: a missing validation file would otherwise end a run after its first training epoch.
        for folder in self.spec.folders.values():
            if folder == self.spec.folders["image"]:
                continue
            directory = self.dir / folder
            present = {p.name for p in directory.glob("*.npy")} if directory.is_dir() else set()
            missing = [i for i in self.indices if f"{i}.npy" not in present]
            if missing:
                more = f" (and {len(missing) - 1} more of the {len(self.indices)} samples)" if len(missing) > 1 else ""
                raise FileNotFoundError(f"missing data file {directory / f'{missing[0]}.npy'}{more}: {image_dir} "
                                        f"holds {missing[0]}.npy")
        # The size every sample must have for a batch to stack: the first image's (its header alone is read).
        # A file of another size is then an error naming it, not default_collate's "stack expects each tensor to
        # be equal size" from the middle of an epoch.
        self._first_image = image_dir / f"{self.indices[0]}.npy"
        try:
            self.size = tuple(np.load(self._first_image, mmap_mode="r", allow_pickle=False).shape[:2])
        except (ValueError, OSError, EOFError):
            self.size = None                          # corrupt: __getitem__ names the file when it reads it
        self.augment = augment
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict[str, Tensor]:
        i = self.indices[item]
        folders = self.spec.folders
        image = _load(self.dir / folders["image"] / f"{i}.npy", (3,))
        label_path = self.dir / folders["segmentation"] / f"{i}.npy"
        label = _load(label_path, ())
        bad = (label < -1) | (label >= self.spec.num_classes) | (label != np.round(label))
        if bad.any():   # else a traceback from the loss or the metrics that names no file (255: another convention)
            raise DatasetError(f"data file {label_path} holds label {label[bad].flat[0]!r}, outside the "
                               f"{self.spec.name} classes -1 (ignore), 0..{self.spec.num_classes - 1}")
        out = {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1),
               "segmentation": torch.from_numpy(label.astype(np.int64)),
               "depth": torch.from_numpy(np.ascontiguousarray(_load(self.dir / folders["depth"] / f"{i}.npy", (1,)),
                                                              dtype=np.float32)).permute(2, 0, 1)}
        if "normal" in folders:
            normal = _load(self.dir / folders["normal"] / f"{i}.npy", (3,))
            out["normal"] = torch.from_numpy(np.ascontiguousarray(normal, dtype=np.float32)).permute(2, 0, 1)
        shapes = {k: tuple(v.shape[-2:]) for k, v in out.items()}
        if len(set(shapes.values())) != 1:
            raise DatasetError(f"{self.spec.name} sample {i} in {self.dir}: spatial sizes differ: {shapes}")
        if self.size is not None and shapes["image"] != self.size:
            raise DatasetError(f"data file {self.dir / folders['image'] / f'{i}.npy'} is {shapes['image'][0]}x"
                               f"{shapes['image'][1]}, but {self._first_image} is {self.size[0]}x{self.size[1]}: "
                               "the samples of a split must have one size to be batched; resize the files")
        if not self.augment:
            return out
        return random_scale_flip(out, sample_generator(self.seed, self.epoch, item), disparity=self.spec.disparity)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The augmentation generator of one sample in one epoch (a fixed function of the three numbers)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_033 + index) % (2 ** 63))


def random_scale_flip(sample: dict[str, Tensor], generator: torch.Generator | None = None,
                      disparity: bool = False) -> dict[str, Tensor]:
    """Scale-crop and flip of one sample; ``disparity``: sample["depth"] is disparity, multiplied by the zoom."""
    height, width = sample["image"].shape[-2:]
    scale = [1.0, 1.2, 1.5][int(torch.randint(3, (1,), generator=generator))]
    h, w = int(height / scale), int(width / scale)
    top = int(torch.randint(height - h + 1, (1,), generator=generator))
    left = int(torch.randint(width - w + 1, (1,), generator=generator))
    out = {}
    for key, value in sample.items():
        crop = value[..., top:top + h, left:left + w]
        if key == "segmentation":
            out[key] = F.interpolate(crop[None, None].float(), size=(height, width), mode="nearest")[0, 0].long()
        elif key in ("depth", "normal"):
            # Nearest keeps invalid (0) pixels invalid instead of smearing them into their neighbours.
            resized = F.interpolate(crop[None], size=(height, width), mode="nearest")[0]
            if key == "depth":
                resized = resized * scale if disparity else resized / scale
            out[key] = resized
        else:
            out[key] = F.interpolate(crop[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    if bool(torch.rand(1, generator=generator) < 0.5):
        out = {k: v.flip(-1) for k, v in out.items()}
        if "normal" in out:
            out["normal"] = out["normal"] * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)
    return out


def image_size(size: int | tuple[int, int], dataset: str) -> tuple[int, int]:
    """(H, W) of a loader's ``size``: an int is a square."""
    height, width = (size, size) if np.ndim(size) == 0 else size
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"{dataset}: size must be positive, got {size}")
    return int(height), int(width)


def synthesize(spec: DenseSpec | str, root: str | os.PathLike, n: int, split: str = "train", seed: int = 0,
               size: tuple[int, int] | None = None) -> pathlib.Path:
    """Write ``n`` learnable scenes in the real on-disk format: a floor and walls (planes) with boxes in front;
    segmentation = which surface, depth = distance along the view ray, normals = the surface normal, and the
    image = the class colour shaded by the normal, so every task is a function of the image."""
    spec = SPECS[spec] if isinstance(spec, str) else spec
    height, width = size or spec.size
    rng = np.random.default_rng(seed)
    out = pathlib.Path(root) / split
    for folder in spec.folders.values():
        (out / folder).mkdir(parents=True, exist_ok=True)
    palette = rng.uniform(0.15, 0.95, size=(spec.num_classes, 3))
    v, u = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    for i in range(n):
        seg = np.full((height, width), 0, dtype=np.int64)
        depth = 2.0 + 1.5 * (1 - np.abs(u)) + 0.5 * rng.uniform()           # back wall, deeper in the middle
        normal = np.stack([np.sign(u) * 0.6, np.zeros_like(u), -np.ones_like(u) * 0.8], axis=-1)
        floor = v > 0.2 + 0.2 * rng.uniform()
        seg[floor] = 1
        depth = np.where(floor, 1.0 / (v + 1e-3) * 0.6, depth)
        normal[floor] = (0.0, -1.0, 0.0)
        for _ in range(rng.integers(2, 5)):                                 # boxes of random classes
            cls = int(rng.integers(2, spec.num_classes))
            cu, cv = rng.uniform(-0.8, 0.8), rng.uniform(-0.6, 0.6)
            ru, rv = rng.uniform(0.1, 0.3), rng.uniform(0.1, 0.3)
            box = (np.abs(u - cu) < ru) & (np.abs(v - cv) < rv)
            seg[box] = cls
            depth[box] = 1.0 + rng.uniform(0.0, 0.8)
            normal[box] = (0.0, 0.0, -1.0)
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
        shade = 0.6 + 0.4 * np.clip(-normal[..., 2:3] * 0.7 - normal[..., 1:2] * 0.3, 0, 1)
        image = np.clip(palette[seg] * shade + rng.normal(0, 0.02, size=(height, width, 3)), 0, 1)
        invalid = rng.uniform(size=(height, width)) < 0.02                   # missing sensor readings
        label = seg.copy()
        label[invalid] = -1
        depth = np.where(invalid, 0.0, depth)[..., None]
        if spec.name == "cityscapes":
            depth = np.where(depth > 0, 1.0 / np.maximum(depth, 1e-3) * 0.05, 0.0)   # disparity
        np.save(out / spec.folders["image"] / f"{i}.npy", image.astype(np.float32))
        np.save(out / spec.folders["segmentation"] / f"{i}.npy", label)
        np.save(out / spec.folders["depth"] / f"{i}.npy", depth.astype(np.float32))
        if "normal" in spec.folders:
            normal = np.where(invalid[..., None], 0.0, normal).astype(np.float32)
            np.save(out / spec.folders["normal"] / f"{i}.npy", normal)
    return out
