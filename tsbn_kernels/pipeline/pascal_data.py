"""PASCAL-Context for multi-task learning in the ASTMT ``PASCAL_MT`` layout (DESIGN.md §5): a loader of the real
on-disk format with the field's augmentation, and a generator of synthetic scenes written in that format.

    {root}/ImageSets/Context/{train,val}.txt      one image id per line (2008_000002 ...)
    {root}/JPEGImages/{id}.jpg                    RGB, about 500×375, sizes vary
    {root}/semseg/VOC12/{id}.png, else {root}/semseg/pascal-context/{id}.png
                                                  8-bit palette or grey, 21 classes 0..20 (VOC; 0 background),
                                                  255 = ignore → −1
    {root}/human_parts/{id}.mat                   ``anno[0][0][1][0]``: the objects; object j: ``[1][0][0]`` the
                                                  category (15 = person), ``[2]`` the instance mask, ``[3]`` the
                                                  parts: empty, or ``[3][0][k]`` = (``[0][0]`` name, ``[1]`` mask);
                                                  the 24 part names map to 6 classes (``HUMAN_PARTS``)
    {root}/pascal-context/trainval/{id}.mat       ``LabelMap``: the full PASCAL-Context labels (edges come from it)
    {root}/normals_distill/{id}.png               RGB 8-bit, normal = 2·v/255 − 1
    {root}/sal_distill/{id}.png                   grey 8-bit, salient = v/255 > 0.5

Conventions of the items (what a training loop and the metrics must know), at the output size H×W (``size``):

* ``segmentation`` [H, W] long: 0..20, −1 = ignore (the VOC 255 outlines, and padding).
* ``human_parts`` [H, W] long: 0 background, 1..6 parts, −1 = ignore. An image without a person that has annotated
  parts is −1 everywhere, so the parts head is trained and scored on person images only (as ASTMT, which only
  counts images with human parts); padding is −1 too.
* ``edge`` [1, H, W] float 0/1: 1 on the pixels of the resized (and augmented) LabelMap that have a 4-neighbour of
  another label — the boundaries of the annotation, one or two pixels wide at the output resolution (ASTMT
  thins a Laplacian of the LabelMap instead). Padding makes no edge.
* ``normal`` [3, H, W] float: unit vectors, 0 = invalid (the NYUv2 convention). ASTMT keeps only pixels whose
  LabelMap class is one of its NYU-like indoor classes; that list is not shipped here, so the caller passes
  ``normals_valid_classes`` (LabelMap ids; None = every pixel valid).
* ``saliency`` [1, H, W] float 0/1, ``image`` [3, H, W] float in [0, 1].

Every map is resized to H×W, stretched (the stored aspect ratio is not kept): bilinear for the image and the
normals (valid normals renormalised to unit length, invalid ones kept 0), nearest for the label maps, the LabelMap
and saliency.
"""
from __future__ import annotations

import os
import pathlib
import struct
import zlib

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .dense_data import image_size, sample_generator
from .errors import DatasetError

TASKS = ("segmentation", "human_parts", "saliency", "normal", "edge")
NUM_CLASSES = {"segmentation": 21, "human_parts": 7}
PERSON = 15
IGNORE = 255
HUMAN_PARTS = {**dict.fromkeys(("hair", "head", "lear", "lebrow", "leye", "mouth", "nose", "rear", "rebrow",
                                "reye"), 1),
               **dict.fromkeys(("neck", "torso"), 2), **dict.fromkeys(("luarm", "ruarm"), 3),
               **dict.fromkeys(("lhand", "llarm", "rhand", "rlarm"), 4), **dict.fromkeys(("luleg", "ruleg"), 5),
               **dict.fromkeys(("lfoot", "llleg", "rfoot", "rlleg"), 6)}
# The PASCAL-Context LabelMap id of each VOC class (ASTMT's CONTEXT_CATEGORY_LABELS); 284 = person.
CONTEXT_IDS = (0, 2, 23, 25, 31, 34, 45, 59, 65, 72, 98, 397, 113, 207, 258, 284, 308, 347, 368, 416, 427)
FOLDERS = ("ImageSets/Context", "JPEGImages", "semseg/pascal-context", "human_parts", "pascal-context/trainval",
           "normals_distill", "sal_distill")

# What the readers raise on a truncated or foreign file (scipy: MatReadError, IndexError, OSError, zlib.error ...;
# PIL: UnidentifiedImageError/OSError, SyntaxError, struct.error ...).
_MAT_ERRORS = (ValueError, OSError, TypeError, IndexError, KeyError, EOFError, struct.error, zlib.error,
               scipy.io.matlab.MatReadError)
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)


def _open_image(path: pathlib.Path, mode: str | None) -> np.ndarray:
    """The pixels of an image file, converted to ``mode`` (None: as stored, e.g. palette indices)."""
    if not path.exists():
        raise FileNotFoundError(f"missing PASCAL-Context file {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img if mode is None else img.convert(mode))
    except _IMAGE_ERRORS as exc:
        raise DatasetError(f"corrupt PASCAL-Context file {path}: {exc}") from exc


def _load_mat(path: pathlib.Path, key: str) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"missing PASCAL-Context file {path}")
    try:
        content = scipy.io.loadmat(path)
    except _MAT_ERRORS as exc:
        raise DatasetError(f"corrupt PASCAL-Context file {path}: {exc}") from exc
    if key not in content:
        raise DatasetError(f"corrupt PASCAL-Context file {path}: no variable {key!r}")
    return content[key]


def decode_human_parts(path: pathlib.Path, shape: tuple[int, int]) -> np.ndarray:
    """The 7-class part map (0 background, 1..6 parts) of one image, or all −1 without a person with parts.
    Where parts of several persons overlap, the later object wins."""
    anno = _load_mat(path, "anno")
    target = None
    try:
        for obj in anno[0][0][1][0]:
            if int(np.asarray(obj[1]).flat[0]) != PERSON or np.asarray(obj[3]).size == 0:
                continue
            if target is None:
                target = np.zeros(np.asarray(obj[2]).shape, dtype=np.int64)
            for part in obj[3][0]:
                name = str(part[0][0])
                if name not in HUMAN_PARTS:
                    raise DatasetError(f"unknown human part name {name!r}")
                mask = np.asarray(part[1])
                if mask.shape != target.shape:
                    raise DatasetError(f"part {name!r} mask is {mask.shape}, the person mask {target.shape}")
                target[mask.astype(bool)] = HUMAN_PARTS[name]
    except (IndexError, TypeError, KeyError, ValueError) as exc:
        raise DatasetError(f"corrupt PASCAL-Context file {path}: not the PASCAL-Part anno structure ({exc})") from exc
    return np.full(shape, -1, dtype=np.int64) if target is None else target


def label_boundaries(labels: Tensor) -> Tensor:
    """1 where a 4-neighbour carries another label; pixels labelled −1 (padding) make no boundary."""
    edge = torch.zeros_like(labels, dtype=torch.bool)
    for dim in (-1, -2):
        n = labels.shape[dim]
        a, b = labels.narrow(dim, 0, n - 1), labels.narrow(dim, 1, n - 1)
        differ = (a != b) & (a >= 0) & (b >= 0)
        edge.narrow(dim, 0, n - 1).logical_or_(differ)
        edge.narrow(dim, 1, n - 1).logical_or_(differ)
    return edge.float()


class PascalContext(torch.utils.data.Dataset):
    """One split of PASCAL-Context. Items at ``size`` = H×W (an int: square): image [3, H, W] float in [0, 1],
    segmentation [H, W] long −1..20, human_parts [H, W] long −1..6, saliency [1, H, W] 0/1, normal [3, H, W]
    (0 = invalid), edge [1, H, W] 0/1 (see the module docstring for the conventions).

    ``augment=True``: the field's augmentation for this dataset — a random scale in [0.75, 1.25] with a random
    H×W crop or pad (padding: image 0, segmentation/human_parts −1, normal 0, saliency 0, no edge) and a random
    horizontal flip (the normal's x negated). The draws of sample i come from ``sample_generator(seed, epoch, i)``,
    so they do not depend on the loading order or on the number of DataLoader workers or DDP ranks (call
    ``set_epoch`` once per epoch)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", size: int | tuple[int, int] = 512,
                 augment: bool = False, seed: int = 0, normals_valid_classes: set[int] | None = None):
        self.root, self.size, self.augment = pathlib.Path(root), image_size(size, "PASCAL-Context"), augment
        self.seed, self.epoch = seed, 0
        self.normals_valid_classes = None if normals_valid_classes is None else set(normals_valid_classes)
        listing = self.root / "ImageSets" / "Context" / f"{split}.txt"
        if not listing.exists():
            raise FileNotFoundError(f"PASCAL-Context: missing split list {listing} (expected the ASTMT PASCAL_MT "
                                    f"layout under {self.root}: {', '.join(f + '/' for f in FOLDERS)})")
        self.ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not self.ids:
            raise DatasetError(f"PASCAL-Context: split list {listing} names no image")
        # Every file of every listed image, checked here from the folder listings (cheap), not when a batch first
        # reads it: a missing validation file would otherwise end a run after its first training epoch.
        listed: dict[pathlib.Path, set[str]] = {}
        for image_id in self.ids:
            for path in self.paths(image_id, listed).values():
                if path.parent not in listed:
                    listed[path.parent] = set(os.listdir(path.parent)) if path.parent.is_dir() else set()
                if path.name not in listed[path.parent]:
                    raise FileNotFoundError(f"missing PASCAL-Context file {path} (image {image_id} of {listing})")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def paths(self, image_id: str, listed: dict[pathlib.Path, set[str]] | None = None) -> dict[str, pathlib.Path]:
        """The files of one image; ``listed``: folder listings to test the VOC12 segmentation's presence with."""
        voc = self.root / "semseg" / "VOC12" / f"{image_id}.png"
        if listed is not None and voc.parent not in listed:
            listed[voc.parent] = set(os.listdir(voc.parent)) if voc.parent.is_dir() else set()
        has_voc = voc.name in listed[voc.parent] if listed is not None else voc.exists()
        return {"image": self.root / "JPEGImages" / f"{image_id}.jpg",
                "segmentation": voc if has_voc else self.root / "semseg" / "pascal-context" / f"{image_id}.png",
                "human_parts": self.root / "human_parts" / f"{image_id}.mat",
                "label_map": self.root / "pascal-context" / "trainval" / f"{image_id}.mat",
                "normal": self.root / "normals_distill" / f"{image_id}.png",
                "saliency": self.root / "sal_distill" / f"{image_id}.png"}

    def load(self, item: int) -> dict[str, Tensor]:
        """The sample at its stored resolution, decoded but not resized: image [3, H, W], segmentation,
        human_parts and label_map [H, W] long, saliency [1, H, W], normal [3, H, W] (2·v/255 − 1, 0 where
        invalid; not renormalised)."""
        paths = self.paths(self.ids[item])
        image = _open_image(paths["image"], "RGB")
        shape = image.shape[:2]

        def same_size(key: str, array: np.ndarray) -> np.ndarray:
            if array.shape[:2] != shape:
                raise DatasetError(f"PASCAL-Context file {paths[key]} is {array.shape[0]}×{array.shape[1]}, its image "
                                   f"{paths['image']} {shape[0]}×{shape[1]}")
            return array

        semseg = _open_image(paths["segmentation"], None)
        if semseg.ndim != 2:
            raise DatasetError(f"corrupt PASCAL-Context file {paths['segmentation']}: expected an 8-bit palette or "
                               f"grey PNG, got {semseg.ndim} dimensions {semseg.shape}")
        semseg = same_size("segmentation", semseg).astype(np.int64)
        bad = (semseg >= NUM_CLASSES["segmentation"]) & (semseg != IGNORE)
        if bad.any():
            raise DatasetError(f"corrupt PASCAL-Context file {paths['segmentation']}: value {int(semseg[bad][0])} is "
                               "no class 0..20 nor 255")
        semseg[semseg == IGNORE] = -1
        label_map = _load_mat(paths["label_map"], "LabelMap")
        if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.number):
            raise DatasetError(f"corrupt PASCAL-Context file {paths['label_map']}: LabelMap must be a 2-D integer map")
        label_map = same_size("label_map", label_map).astype(np.int64)
        parts = same_size("human_parts", decode_human_parts(paths["human_parts"], shape))
        normal = same_size("normal", _open_image(paths["normal"], "RGB")).astype(np.float32) * (2.0 / 255.0) - 1.0
        if self.normals_valid_classes is not None:
            normal[~np.isin(label_map, sorted(self.normals_valid_classes))] = 0.0
        saliency = same_size("saliency", _open_image(paths["saliency"], "L")).astype(np.float32) / 255.0 > 0.5
        return {"image": torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous(),
                "segmentation": torch.from_numpy(semseg), "human_parts": torch.from_numpy(parts),
                "label_map": torch.from_numpy(label_map),
                "normal": torch.from_numpy(np.ascontiguousarray(normal)).permute(2, 0, 1).contiguous(),
                "saliency": torch.from_numpy(saliency.astype(np.float32))[None]}

    def __getitem__(self, item: int) -> dict[str, Tensor]:
        sample = self.load(item)
        generator = sample_generator(self.seed, self.epoch, item) if self.augment else None
        sample = random_scale_crop(sample, self.size, generator)
        if generator is not None and bool(torch.rand(1, generator=generator) < 0.5):
            sample = horizontal_flip(sample)
        sample["edge"] = label_boundaries(sample.pop("label_map"))[None]
        return sample


def resize_normals(normal: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of a [3, H, W] normal map with 0 = invalid: a pixel is valid where its nearest source pixel
    is; valid pixels are the renormalised bilinear average (invalid neighbours add nothing to the direction)."""
    valid = (normal != 0).any(dim=0, keepdim=True).float()
    valid = F.interpolate(valid[None], size=size, mode="nearest-exact")[0] > 0.5
    smooth = F.interpolate(normal[None], size=size, mode="bilinear", align_corners=False)[0]
    length = smooth.norm(dim=0, keepdim=True)
    keep = valid & (length > 1e-6)
    return torch.where(keep, smooth / length.clamp_min(1e-6), torch.zeros(()))


def _resize(key: str, value: Tensor, size: tuple[int, int]) -> Tensor:
    if key == "image":
        return F.interpolate(value[None], size=size, mode="bilinear", align_corners=False)[0].clamp_(0, 1)
    if key == "normal":
        return resize_normals(value, size)
    source = value if value.dim() == 3 else value[None]                 # label maps and saliency: nearest
    resized = F.interpolate(source[None].float(), size=size, mode="nearest-exact")[0]
    return (resized if value.dim() == 3 else resized[0]).to(value.dtype)


PAD = {"image": 0.0, "segmentation": -1, "human_parts": -1, "label_map": -1, "normal": 0.0, "saliency": 0.0}


def random_scale_crop(sample: dict[str, Tensor], size: int | tuple[int, int],
                      generator: torch.Generator | None) -> dict[str, Tensor]:
    """Resize every map to H×W (``size``; an int: square); with a generator, to H·s×W·s for a random s in
    [0.75, 1.25], then a random H×W window (s > 1) or the map at a random place on an H×W canvas of ``PAD``
    (s < 1)."""
    height, width = image_size(size, "PASCAL-Context")
    scale = 1.0 if generator is None else 0.75 + 0.5 * float(torch.rand(1, generator=generator))
    scaled = (max(1, round(height * scale)), max(1, round(width * scale)))
    out = {key: _resize(key, value, scaled) for key, value in sample.items()}
    if scaled != (height, width):
        top = int(torch.randint(abs(scaled[0] - height) + 1, (1,), generator=generator))
        left = int(torch.randint(abs(scaled[1] - width) + 1, (1,), generator=generator))
        # Per axis a window of the scaled map (larger) or a place on the canvas (smaller): rounding can leave
        # one axis at the output size while the other differs.
        (src_h, dst_h), (src_w, dst_w) = (_window(scaled[0], height, top), _window(scaled[1], width, left))
        for key, value in out.items():
            canvas = torch.full((*value.shape[:-2], height, width), PAD[key], dtype=value.dtype)
            canvas[..., dst_h, dst_w] = value[..., src_h, src_w]
            out[key] = canvas
    return {key: value.contiguous() for key, value in out.items()}


def _window(scaled: int, size: int, offset: int) -> tuple[slice, slice]:
    """(source, destination) slices of one axis: crop ``size`` from ``offset`` of a larger map, or put a smaller
    one at ``offset`` of the canvas."""
    if scaled >= size:
        return slice(offset, offset + size), slice(0, size)
    return slice(0, scaled), slice(offset, offset + scaled)


def horizontal_flip(sample: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {key: value.flip(-1) for key, value in sample.items()}
    out["normal"] = out["normal"] * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)   # x points the other way
    return out


# ----------------------------------------------------------------------------------------------------------------
# Synthetic scenes in the PASCAL_MT layout.

PART_SHADES = {1: 1.0, 2: 0.75, 3: 0.6, 4: 0.9, 5: 0.5, 6: 0.35}        # brightness of each part class
STUFF_IDS = {"wall": 440, "floor": 160}      # LabelMap ids of the two background regions (outside CONTEXT_IDS)
LIGHT = np.array([0.3, -0.4, -0.87]) / np.linalg.norm([0.3, -0.4, -0.87])


def _person_parts(height: int, width: int, cx: float, top: float, tall: float) -> list[tuple[str, np.ndarray]]:
    """A standing figure as (PASCAL-Part name, mask) pairs, later pairs drawn over earlier ones. "l" parts are on
    the image's right (the person faces the camera)."""
    y, x = np.mgrid[0:height, 0:width] + 0.5
    u = tall / 8

    def box(x0, x1, y0, y1):
        return (x >= min(x0, x1)) & (x < max(x0, x1)) & (y >= top + y0 * u) & (y < top + y1 * u)

    head = ((x - cx) / u) ** 2 + ((y - top - u) / u) ** 2 <= 1
    parts = [("torso", box(cx - 1.2 * u, cx + 1.2 * u, 2.0, 5.0)), ("neck", box(cx - 0.4 * u, cx + 0.4 * u, 1.8, 2.4)),
             ("head", head), ("hair", head & (y < top + 0.6 * u))]
    for side, s in (("l", 1), ("r", -1)):
        shoulder, hip = cx + s * 1.2 * u, cx + s * 0.1 * u
        parts += [(f"{side}uarm", box(shoulder, shoulder + s * 0.8 * u, 2.0, 3.5)),
                  (f"{side}larm", box(shoulder, shoulder + s * 0.8 * u, 3.5, 4.6)),
                  (f"{side}hand", box(shoulder + s * 0.1 * u, shoulder + s * 0.7 * u, 4.6, 5.3)),
                  (f"{side}uleg", box(hip, hip + s * u, 5.0, 6.5)),
                  (f"{side}lleg", box(hip, hip + s * u, 6.5, 7.5)),
                  (f"{side}foot", box(hip, hip + s * 1.5 * u, 7.5, 8.0))]
    drawn = np.zeros((height, width), dtype=np.int64)                    # index + 1 of the visible part
    for k, (_, mask) in enumerate(parts):
        drawn[mask] = k + 1
    return [(name, drawn == k + 1) for k, (name, _) in enumerate(parts) if (drawn == k + 1).any()]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def synthetic_scene(seed: int, index: int, size: tuple[int, int] = (64, 64)) -> dict[str, np.ndarray]:
    """Scene ``index`` of ``synthesize(..., seed, size)``, as the arrays written to disk: image (H, W, 3) uint8
    (before JPEG), semseg (H, W) uint8 with 255 outlines, human_parts (H, W) int64 (the decoded ground truth: −1
    everywhere without a person), label_map (H, W) uint16, normal (H, W, 3) uint8, saliency (H, W) uint8 and
    objects, the PASCAL-Part ``anno.objects`` struct array."""
    height, width = size
    palette = np.random.default_rng(seed).integers(40, 216, size=(21, 3)).astype(np.float64)
    palette[PERSON] = np.maximum(palette[PERSON], 150)                   # bright enough for the six part shades
    rng = np.random.default_rng([seed, index + 1])
    y, x = np.mgrid[0:height, 0:width] + 0.5
    # Background: a wall above a floor, two PASCAL-Context "stuff" labels of semseg class 0.
    floor = y > rng.uniform(0.45, 0.75) * height
    seg = np.zeros((height, width), dtype=np.int64)
    label_map = np.where(floor, STUFF_IDS["floor"], STUFF_IDS["wall"]).astype(np.uint16)
    normal = np.where(floor[..., None], _unit(np.array([0.0, -0.8, -0.6])), np.array([0.0, 0.0, -1.0]))
    colour = np.where(floor[..., None], 0.55 * palette[0], palette[0])
    # Objects of distinct VOC classes (so the LabelMap id of each is its own): domes (ellipses) and tilted boxes.
    objects = []
    classes = rng.choice([c for c in range(1, 21) if c != PERSON], size=int(rng.integers(1, 4)), replace=False)
    for cls in classes.tolist():
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        rx, ry = rng.uniform(0.08, 0.2) * width, rng.uniform(0.08, 0.2) * height
        dx, dy = (x - cx) / rx, (y - cy) / ry
        if rng.uniform() < 0.5:
            mask = dx ** 2 + dy ** 2 <= 1
            surface = _unit(np.stack([0.7 * dx, 0.7 * dy, -np.sqrt(np.clip(1 - 0.49 * (dx ** 2 + dy ** 2), 0, 1))], -1))
        else:
            mask = (np.abs(dx) <= 1) & (np.abs(dy) <= 1)
            surface = np.broadcast_to(_unit(np.array([*rng.normal(0, 0.4, size=2), -1.0])), (height, width, 3))
        seg[mask], label_map[mask] = cls, CONTEXT_IDS[cls]
        normal[mask], colour[mask] = surface[mask], palette[cls]
        objects.append([cls, mask])
    # Every other scene holds a person in front, its six part classes in six shades.
    part_masks = []
    if index % 2 == 1:
        part_masks = _person_parts(height, width, rng.uniform(0.3, 0.7) * width, rng.uniform(0.05, 0.2) * height,
                                   rng.uniform(0.55, 0.75) * height)
        body = np.any([m for _, m in part_masks], axis=0)
        seg[body], label_map[body] = PERSON, CONTEXT_IDS[PERSON]
        normal[body] = _unit(np.array([*rng.normal(0, 0.3, size=2), -1.0]))
        for name, mask in part_masks:
            colour[mask] = palette[PERSON] * PART_SHADES[HUMAN_PARTS[name]]
        objects.append([PERSON, body])
    parts = np.full((height, width), -1, dtype=np.int64)
    if part_masks:
        parts[:] = 0
        for name, mask in part_masks:
            parts[mask] = HUMAN_PARTS[name]
    shade = np.clip(0.55 + 0.45 * (normal @ LIGHT), 0.2, 1.0)[..., None]
    image = np.clip(colour * shade + rng.normal(0, 3, size=colour.shape), 0, 255).round().astype(np.uint8)
    # The .mat objects: instance masks are what stays visible; only the person has parts.
    records = np.zeros((1, len(objects)), dtype=[("class", object), ("class_ind", object), ("mask", object),
                                                  ("parts", object)])
    for j, (cls, mask) in enumerate(objects):
        visible = (seg == cls).astype(np.uint8)
        part_records = np.zeros((0, 0))
        if cls == PERSON:
            part_records = np.zeros((1, len(part_masks)), dtype=[("part_name", object), ("mask", object)])
            for k, (name, part) in enumerate(part_masks):
                part_records[0, k] = (name, part.astype(np.uint8))
        records[0, j] = ("person" if cls == PERSON else "object", np.array([[cls]], dtype=np.uint8), visible,
                         part_records)
    # VOC draws a 255 (ignore) band along object outlines; here the object pixels next to another label.
    semseg = seg.copy()
    semseg[label_boundaries(torch.from_numpy(seg)).bool().numpy() & (seg > 0)] = IGNORE
    return {"image": image, "semseg": semseg.astype(np.uint8), "human_parts": parts, "label_map": label_map,
            "normal": np.round((normal + 1) / 2 * 255).astype(np.uint8),
            "saliency": ((seg > 0) * 255).astype(np.uint8), "objects": records}


def synthesize(root: str | os.PathLike, n: int, seed: int = 0, size: tuple[int, int] = (64, 64),
               val_fraction: float = 0.25) -> pathlib.Path:
    """Write ``n`` synthetic scenes in the PASCAL_MT layout (``synthetic_scene`` gives each one's arrays): a wall
    and a floor with one to three objects of distinct random VOC classes (coloured by class) and, in every other
    image, a person in front made of PASCAL-Part named parts (the six part classes in six shades). segmentation =
    class, human_parts = the person's parts, saliency = the objects and the person, LabelMap = a label per object
    and per background region (edges = their outlines), normals = a smooth orientation per object (domes, tilted
    boxes) that shades the image, so every task is a visible function of the image. The last
    ``round(n · val_fraction)`` ids (at least one if ``val_fraction > 0`` and n > 1) form the val list."""
    root = pathlib.Path(root)
    for folder in FOLDERS:
        (root / folder).mkdir(parents=True, exist_ok=True)
    ids = [f"2008_{i + 1:06d}" for i in range(n)]
    for i, image_id in enumerate(ids):
        scene = synthetic_scene(seed, i, tuple(size))
        Image.fromarray(scene["image"]).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        Image.fromarray(scene["semseg"]).save(root / "semseg" / "pascal-context" / f"{image_id}.png")
        Image.fromarray(scene["saliency"]).save(root / "sal_distill" / f"{image_id}.png")
        Image.fromarray(scene["normal"]).save(root / "normals_distill" / f"{image_id}.png")
        scipy.io.savemat(root / "pascal-context" / "trainval" / f"{image_id}.mat", {"LabelMap": scene["label_map"]})
        scipy.io.savemat(root / "human_parts" / f"{image_id}.mat",
                         {"anno": {"imname": image_id, "objects": scene["objects"]}})
    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
    (root / "ImageSets" / "Context" / "train.txt").write_text("".join(f"{i}\n" for i in ids[:n - n_val]))
    (root / "ImageSets" / "Context" / "val.txt").write_text("".join(f"{i}\n" for i in ids[n - n_val:]))
    return root
