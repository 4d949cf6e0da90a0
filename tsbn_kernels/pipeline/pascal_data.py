"""PASCAL-Context for multi-task learning in the ASTMT ``PASCAL_MT`` layout (DESIGN.md §5): a loader of the real
on-disk format with the field's augmentation, and a generator of synthetic scenes written in that format.

    {root}/ImageSets/Context/{train,val}.txt      one image id per line (2008_000002 ...)
    {root}/JPEGImages/{id}.jpg                    RGB, about 500×375
    {root}/semseg/VOC12/{id}.png, else {root}/semseg/pascal-context/{id}.png
                                                  21 classes 0..20 (VOC; 0 background), 255 ignore → −1
    {root}/human_parts/{id}.mat                   anno[0][0][1][0]: the objects; object j: [1][0][0] category
                                                  (15 = person), [2] instance mask, [3] parts (empty, or
                                                  [3][0][k] = (name, mask)); 24 part names → 6 classes
    {root}/pascal-context/trainval/{id}.mat       LabelMap: the full PASCAL-Context labels (edges come from it)
    {root}/normals_distill/{id}.png               RGB, normal = 2·v/255 − 1
    {root}/sal_distill/{id}.png                   grey, salient = v/255 > 0.5

Conventions of the items: ``human_parts`` is −1 (ignored) over the whole image when it holds no person with
annotated parts, so the parts head is trained and scored on person images only; ``edge`` is 1 on the pixels of
the (resized, augmented) LabelMap that have a 4-neighbour of another label — the boundaries of the annotation,
one or two pixels wide, where ASTMT thins a Laplacian; ``normal`` is 0 (invalid, as NYUv2) outside the LabelMap
classes in ``normals_valid_classes`` (ASTMT keeps the NYU-like indoor classes; None keeps every pixel).
"""
from __future__ import annotations

import os
import pathlib

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

from .dense_data import sample_generator

TASKS = ("segmentation", "human_parts", "saliency", "normal", "edge")
NUM_CLASSES = {"segmentation": 21, "human_parts": 7}
PERSON = 15
HUMAN_PARTS = {**dict.fromkeys(("hair", "head", "lear", "lebrow", "leye", "mouth", "nose", "rear", "rebrow", "reye"), 1),
               **dict.fromkeys(("neck", "torso"), 2), **dict.fromkeys(("luarm", "ruarm"), 3),
               **dict.fromkeys(("lhand", "llarm", "rhand", "rlarm"), 4), **dict.fromkeys(("luleg", "ruleg"), 5),
               **dict.fromkeys(("lfoot", "llleg", "rfoot", "rlleg"), 6)}
# The PASCAL-Context LabelMap id of each VOC class (ASTMT's CONTEXT_CATEGORY_LABELS).
CONTEXT_IDS = (0, 2, 23, 25, 31, 34, 45, 59, 65, 72, 98, 397, 113, 207, 258, 284, 308, 347, 368, 416, 427)


def _open_image(path: pathlib.Path, mode: str) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"missing PASCAL-Context file {path}")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert(mode) if mode != "keep" else img)
    except OSError as exc:
        raise ValueError(f"corrupt PASCAL-Context file {path}: {exc}") from exc


def _load_mat(path: pathlib.Path, key: str) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"missing PASCAL-Context file {path}")
    try:
        content = scipy.io.loadmat(path)
    except (ValueError, OSError, TypeError) as exc:
        raise ValueError(f"corrupt PASCAL-Context file {path}: {exc}") from exc
    if key not in content:
        raise ValueError(f"corrupt PASCAL-Context file {path}: no variable {key!r}")
    return content[key]


def decode_human_parts(path: pathlib.Path, shape: tuple[int, int]) -> np.ndarray:
    """The 7-class part map (0 background, 1..6 parts) of one image, or all −1 without an annotated person."""
    try:
        objects = _load_mat(path, "anno")[0][0][1][0]
        target = None
        for obj in objects:
            if int(obj[1][0][0]) != PERSON or len(obj[3]) == 0:
                continue
            if target is None:
                target = np.zeros(obj[2].shape, dtype=np.int64)
            for part in obj[3][0]:
                name = str(part[0][0])
                if name not in HUMAN_PARTS:
                    raise ValueError(f"unknown human part {name!r}")
                target[part[1].astype(bool)] = HUMAN_PARTS[name]
    except (IndexError, TypeError, KeyError) as exc:
        raise ValueError(f"corrupt PASCAL-Context file {path}: not the ASTMT human_parts structure ({exc})") from exc
    except ValueError as exc:
        if str(path) in str(exc):
            raise
        raise ValueError(f"corrupt PASCAL-Context file {path}: {exc}") from exc
    return np.full(shape, -1, dtype=np.int64) if target is None else target


def label_boundaries(labels: Tensor) -> Tensor:
    """1 where a 4-neighbour carries another label; pixels labelled −1 (padding) make no boundary."""
    edge = torch.zeros_like(labels, dtype=torch.bool)
    for dim in (-1, -2):
        a, b = labels.narrow(dim, 0, labels.shape[dim] - 1), labels.narrow(dim, 1, labels.shape[dim] - 1)
        differ = (a != b) & (a >= 0) & (b >= 0)
        edge.narrow(dim, 0, labels.shape[dim] - 1).logical_or_(differ)
        edge.narrow(dim, 1, labels.shape[dim] - 1).logical_or_(differ)
    return edge.float()


class PascalContext(torch.utils.data.Dataset):
    """One split of PASCAL-Context. Items: image [3, S, S] float in [0, 1], segmentation [S, S] long −1..20,
    human_parts [S, S] long −1..6, saliency [1, S, S] 0/1, normal [3, S, S] (0 = invalid), edge [1, S, S] 0/1.

    Every map is resized to S×S (bilinear for the image, nearest for the rest). ``augment=True``: the field's
    random scaling in [0.75, 1.25] with a random S×S crop (padding: image 0, labels −1, normal 0, saliency 0)
    and a horizontal flip (the normal's x negated); the draws of sample i are a function of (seed, epoch, i)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", size: int = 512, augment: bool = False,
                 seed: int = 0, normals_valid_classes: set[int] | None = None):
        self.root, self.size, self.augment = pathlib.Path(root), size, augment
        self.seed, self.epoch = seed, 0
        self.normals_valid_classes = normals_valid_classes
        listing = self.root / "ImageSets" / "Context" / f"{split}.txt"
        if not listing.exists():
            raise FileNotFoundError(f"PASCAL-Context: missing split list {listing} (expected the ASTMT PASCAL_MT "
                                    "layout: ImageSets/Context/{train,val}.txt, JPEGImages/, semseg/, human_parts/, "
                                    "pascal-context/trainval/, normals_distill/, sal_distill/)")
        self.ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not self.ids:
            raise ValueError(f"PASCAL-Context: split list {listing} names no image")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def _semseg_path(self, image_id: str) -> pathlib.Path:
        voc = self.root / "semseg" / "VOC12" / f"{image_id}.png"
        return voc if voc.exists() else self.root / "semseg" / "pascal-context" / f"{image_id}.png"

    def load(self, item: int) -> dict[str, Tensor]:
        """The sample at its stored resolution: image [3, H, W], segmentation/human_parts/label_map [H, W],
        saliency [1, H, W], normal [3, H, W]."""
        image_id = self.ids[item]
        image = _open_image(self.root / "JPEGImages" / f"{image_id}.jpg", "RGB")
        shape = image.shape[:2]
        semseg = _open_image(self._semseg_path(image_id), "keep").astype(np.int64)
        semseg[semseg == 255] = -1
        label_map = _load_mat(self.root / "pascal-context" / "trainval" / f"{image_id}.mat", "LabelMap")
        parts = decode_human_parts(self.root / "human_parts" / f"{image_id}.mat", shape)
        normal = _open_image(self.root / "normals_distill" / f"{image_id}.png", "RGB").astype(np.float32)
        normal = 2.0 * normal / 255.0 - 1.0
        if self.normals_valid_classes is not None:
            normal[~np.isin(label_map, list(self.normals_valid_classes))] = 0.0
        saliency = (_open_image(self.root / "sal_distill" / f"{image_id}.png", "L") / 255.0 > 0.5)
        maps = {"segmentation": semseg, "human_parts": parts, "label_map": label_map.astype(np.int64)}
        for key, value in maps.items():
            if value.shape != shape:
                raise ValueError(f"PASCAL-Context sample {image_id}: {key} is {value.shape[0]}×{value.shape[1]}, "
                                 f"the image {shape[0]}×{shape[1]}")
        if normal.shape[:2] != shape or saliency.shape != shape:
            raise ValueError(f"PASCAL-Context sample {image_id}: normal or saliency map size differs from the image")
        out = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in maps.items()}
        out["image"] = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)
        out["normal"] = torch.from_numpy(normal).permute(2, 0, 1)
        out["saliency"] = torch.from_numpy(saliency.astype(np.float32))[None]
        return out

    def __getitem__(self, item: int) -> dict[str, Tensor]:
        sample = self.load(item)
        generator = sample_generator(self.seed, self.epoch, item) if self.augment else None
        sample = random_scale_crop(sample, self.size, generator)
        if generator is not None and bool(torch.rand(1, generator=generator) < 0.5):
            sample = horizontal_flip(sample)
        label_map = sample.pop("label_map")
        sample["edge"] = label_boundaries(label_map)[None]
        return sample


def _resize(value: Tensor, size: tuple[int, int], bilinear: bool) -> Tensor:
    if bilinear:
        return F.interpolate(value[None], size=size, mode="bilinear", align_corners=False)[0]
    source = value if value.dim() == 3 else value[None]
    resized = F.interpolate(source[None].float(), size=size, mode="nearest")[0]
    return (resized if value.dim() == 3 else resized[0]).to(value.dtype)


PAD = {"image": 0.0, "segmentation": -1, "human_parts": -1, "label_map": -1, "normal": 0.0, "saliency": 0.0}


def random_scale_crop(sample: dict[str, Tensor], size: int, generator: torch.Generator | None) -> dict[str, Tensor]:
    """Resize to S×S; with a generator, first scale by a random factor in [0.75, 1.25] and crop or pad to S×S."""
    scale = 1.0 if generator is None else 0.75 + 0.5 * float(torch.rand(1, generator=generator))
    scaled = max(1, round(size * scale))
    out = {key: _resize(value, (scaled, scaled), key == "image") for key, value in sample.items()}
    if scaled != size:
        # Larger: a random S×S window; smaller: the map at a random place on an S×S canvas of padding.
        offset = int(torch.randint(abs(scaled - size) + 1, (1,), generator=generator))
        offset2 = int(torch.randint(abs(scaled - size) + 1, (1,), generator=generator))
        for key, value in out.items():
            if scaled > size:
                out[key] = value[..., offset:offset + size, offset2:offset2 + size]
            else:
                canvas = torch.full((*value.shape[:-2], size, size), PAD[key], dtype=value.dtype)
                canvas[..., offset:offset + scaled, offset2:offset2 + scaled] = value
                out[key] = canvas
    return {key: value.contiguous() for key, value in out.items()}


def horizontal_flip(sample: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {key: value.flip(-1) for key, value in sample.items()}
    out["normal"] = out["normal"] * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)   # x points the other way
    return out


PART_SHADES = {1: 1.0, 2: 0.75, 3: 0.6, 4: 0.9, 5: 0.5, 6: 0.35}


def _person(draw_parts: ImageDraw.ImageDraw, cx: float, top: float, height: float) -> None:
    """A standing figure whose regions are the six part classes, drawn with the part class as the pixel value."""
    unit = height / 8
    draw_parts.ellipse((cx - unit, top, cx + unit, top + 2 * unit), fill=1)                          # head
    draw_parts.rectangle((cx - 1.2 * unit, top + 2 * unit, cx + 1.2 * unit, top + 5 * unit), fill=2)  # torso
    for side in (-1, 1):
        arm = cx + side * 1.2 * unit
        draw_parts.rectangle((min(arm, arm + side * 0.8 * unit), top + 2 * unit, max(arm, arm + side * 0.8 * unit),
                              top + 3.5 * unit), fill=3)                                                 # upper arm
        draw_parts.rectangle((min(arm, arm + side * 0.8 * unit), top + 3.5 * unit,
                              max(arm, arm + side * 0.8 * unit), top + 4.8 * unit), fill=4)              # lower arm
        leg = cx + side * 0.6 * unit
        draw_parts.rectangle((min(leg, leg - side * unit), top + 5 * unit, max(leg, leg - side * unit),
                              top + 6.5 * unit), fill=5)                                                 # upper leg
        draw_parts.rectangle((min(leg, leg - side * unit), top + 6.5 * unit, max(leg, leg - side * unit),
                              top + 8 * unit), fill=6)                                                   # lower leg


def _part_records(part_map: np.ndarray) -> np.ndarray:
    names = {1: "head", 2: "torso", 3: "luarm", 4: "llarm", 5: "luleg", 6: "llleg"}
    present = [k for k in names if (part_map == k).any()]
    records = np.zeros((1, len(present)), dtype=[("part_name", object), ("mask", object)])
    for i, k in enumerate(present):
        records[0, i] = (names[k], (part_map == k).astype(np.uint8))
    return records


def synthesize(root: str | os.PathLike, n: int, seed: int = 0, size: tuple[int, int] = (64, 64),
               val_fraction: float = 0.25) -> pathlib.Path:
    """Write ``n`` synthetic scenes in the PASCAL_MT layout: a background with a few objects of random VOC
    classes (ellipses and boxes coloured by class) and, in about half of the images, a person made of the six
    part regions (each shaded differently). segmentation = class, human_parts = the figure's parts, saliency =
    every object, LabelMap = the context id of each class (edges = object outlines), normals = one orientation
    per object, which also shades the image. Every task is therefore a visible function of the image."""
    root = pathlib.Path(root)
    height, width = size
    for folder in ("ImageSets/Context", "JPEGImages", "semseg/pascal-context", "human_parts",
                   "pascal-context/trainval", "normals_distill", "sal_distill"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    palette = rng.integers(30, 226, size=(21, 3))
    light = np.array([0.3, -0.4, -0.87])
    ids = [f"2008_{i + 1:06d}" for i in range(n)]
    obj_dtype = [("class", object), ("classind", object), ("mask", object), ("parts", object)]
    for image_id in ids:
        semseg = Image.new("L", (width, height), 0)
        parts_img = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(semseg)
        normal = np.tile(np.array([0.0, 0.0, -1.0]), (height, width, 1))
        objects = []
        for _ in range(int(rng.integers(1, 4))):
            cls = int(rng.choice([c for c in range(1, 21) if c != PERSON]))
            cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
            rx, ry = rng.uniform(0.08, 0.2) * width, rng.uniform(0.08, 0.2) * height
            box = (cx - rx, cy - ry, cx + rx, cy + ry)
            (draw.ellipse if rng.uniform() < 0.5 else draw.rectangle)(box, fill=cls)
            objects.append(cls)
        person = rng.uniform() < 0.5
        if person:
            _person(ImageDraw.Draw(parts_img), rng.uniform(0.3, 0.7) * width, rng.uniform(0.05, 0.25) * height,
                    rng.uniform(0.5, 0.7) * height)
        part_map = np.asarray(parts_img, dtype=np.int64)
        seg = np.asarray(semseg, dtype=np.int64).copy()
        seg[part_map > 0] = PERSON
        for cls in set(seg.flatten().tolist()) - {0}:
            tilt = rng.normal(0, 0.5, size=2)
            direction = np.array([tilt[0], tilt[1], -1.0])
            normal[seg == cls] = direction / np.linalg.norm(direction)
        shade = np.clip(0.55 + 0.45 * (normal @ light), 0.2, 1.0)[..., None]
        colour = palette[seg].astype(np.float64)
        if person:
            colour[part_map > 0] *= np.vectorize(PART_SHADES.get)(part_map[part_map > 0])[:, None]
        image = np.clip(colour * shade + rng.normal(0, 3, size=colour.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        # VOC marks object outlines as 255 (ignored); one pixel inside each outline here.
        label = seg.copy()
        label[label_boundaries(torch.from_numpy(seg)).bool().numpy() & (seg > 0)] = 255
        Image.fromarray(label.astype(np.uint8)).save(root / "semseg" / "pascal-context" / f"{image_id}.png")
        Image.fromarray((seg > 0).astype(np.uint8) * 255).save(root / "sal_distill" / f"{image_id}.png")
        Image.fromarray(np.round((normal + 1) / 2 * 255).astype(np.uint8)).save(
            root / "normals_distill" / f"{image_id}.png")
        scipy.io.savemat(root / "pascal-context" / "trainval" / f"{image_id}.mat",
                         {"LabelMap": np.asarray(CONTEXT_IDS, dtype=np.uint16)[seg]})
        records = np.zeros((1, len(objects) + int(person)), dtype=obj_dtype)
        for j, cls in enumerate(objects):
            records[0, j] = ("object", np.array([[cls]], dtype=np.uint8), (seg == cls).astype(np.uint8),
                             np.zeros((0, 0)))
        if person:
            records[0, len(objects)] = ("person", np.array([[PERSON]], dtype=np.uint8),
                                        (part_map > 0).astype(np.uint8), _part_records(part_map))
        scipy.io.savemat(root / "human_parts" / f"{image_id}.mat", {"anno": {"imname": image_id, "objects": records}})
    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
    (root / "ImageSets" / "Context" / "train.txt").write_text("\n".join(ids[:n - n_val]) + "\n")
    (root / "ImageSets" / "Context" / "val.txt").write_text("\n".join(ids[n - n_val:]) + "\n")
    return root
