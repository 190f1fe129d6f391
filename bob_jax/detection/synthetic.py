"""An embedded synthetic instance-segmentation dataset: shapes on textured backgrounds, in COCO format.

Each image shows 1..`max_objects` shapes of `SHAPE_CLASSES` (circle, square, triangle, ellipse, star),
with random size (radius log-uniform in 5-22 % of the shorter side), position (centre anywhere in the
image, so shapes may leave the frame), rotation and colour, painted in order so later shapes occlude
earlier ones. Annotations describe the VISIBLE part of every shape:
  mask   = pixels whose centre lies inside the shape and inside no shape painted above it,
  bbox   = the tight box around that mask in pixel-edge coordinates ([x, y, w, h], as pycocotools'
           `toBbox` of the mask's RLE: x = first column, w = last column + 1 - x),
  area   = the mask's pixel count.
Shapes whose visible area is tiny (fewer than `MIN_VISIBLE_AREA` pixels, or less than
`MIN_VISIBLE_FRACTION` of the shape's in-frame area) are dropped and NOT painted, so every visible shape
is annotated. Edges are hard (no antialiasing): the image agrees with the masks pixel for pixel.

Domains. `shift=False`: low-saturation backgrounds (smooth gradients, blotchy value noise) and flat,
saturated shapes, light pixel noise. `shift=True` (the domain-shifted twin for OOD detection): dark,
saturated, high-frequency backgrounds (stripes, checkerboards) and pale, striped shapes, stronger pixel
noise. Both domains draw the scene geometry (classes, sizes, positions, rotations, occlusion) from the
same distribution with the same random stream: for one seed, the twin shows the same scenes with the
same annotations in another look (a pure appearance shift); use another seed for different scenes.

Determinism. Image `i` of a set depends only on (seed, i, shift): every random number comes from PCG64
seeded with `SeedSequence([seed, i, stream])` and is derived from the raw 64-bit output (uniforms from
the top 53 bits, normals by Box-Muller), which NumPy keeps stable across releases, unlike
`Generator.normal`. So the same seed gives identical pixels and annotation bytes, and the first n
images of a larger set equal a set of n images.

API: `make_synthetic(n, seed, size, shift)` -> `SyntheticSet(coco, images)` (a COCO dict with RLE
segmentations and category ids 1..C, plus uint8 HxWx3 arrays); `write_coco_dataset(root, split, n, seed,
size, shift)` writes `<root>/<split>/images/*.png` and `<root>/<split>/annotations.json` atomically, for
`bob_jax.detection.data.CocoDetection`. pycocotools is imported lazily (RLE encoding).
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MIN_VISIBLE_AREA",
    "MIN_VISIBLE_FRACTION",
    "SHAPE_CLASSES",
    "SyntheticSet",
    "categories",
    "make_synthetic",
    "render_scene",
    "write_coco_dataset",
]

SHAPE_CLASSES = ("circle", "square", "triangle", "ellipse", "star")
MIN_VISIBLE_AREA = 24  # pixels
MIN_VISIBLE_FRACTION = 0.25  # of the shape's in-frame area
FORMAT_VERSION = 1  # bump when the generator's output changes (recorded in the json's info)

_GEOMETRY_STREAM, _APPEARANCE_STREAM = 0, 1
_RADIUS_RANGE = (0.05, 0.22)  # fraction of the shorter image side, log-uniform
_ELLIPSE_ASPECT = (0.4, 0.65)  # minor / major axis: visibly not a circle
_STAR_INNER = 0.45  # inner / outer radius of the 5-pointed star


def categories() -> list[dict[str, Any]]:
    """COCO categories: ids 1..C in `SHAPE_CLASSES` order."""
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES)]


# --------------------------------------------------------------------------------------------------
# Version-stable random numbers
# --------------------------------------------------------------------------------------------------


class _Draw:
    """Uniforms and normals from PCG64's raw stream (stable across NumPy releases)."""

    def __init__(self, seed: int, index: int, stream: int):
        self._bits = np.random.PCG64(np.random.SeedSequence([seed, index, stream]))

    def uniform(self, low: float = 0.0, high: float = 1.0, size=None):
        n = 1 if size is None else int(np.prod(size))
        u = (self._bits.random_raw(n) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        u = low + (high - low) * u
        return float(u[0]) if size is None else u.reshape(size)

    def integer(self, low: int, high: int) -> int:
        """Uniform integer in [low, high)."""
        return min(low + int(self.uniform() * (high - low)), high - 1)

    def normal(self, size) -> np.ndarray:
        n = int(np.prod(size))
        u1 = self.uniform(size=(n + 1) // 2)
        u2 = self.uniform(size=(n + 1) // 2)
        r = np.sqrt(-2.0 * np.log1p(-u1))  # 1 - u1 lies in (0, 1]
        z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])
        return z[:n].reshape(size)


# --------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    cls: int  # 0-based index into SHAPE_CLASSES
    cx: float
    cy: float
    radius: float
    angle: float
    aspect: float  # ellipse minor/major ratio (1 for the others)


def _sample_shapes(draw: _Draw, height: int, width: int, max_objects: int) -> list[_Shape]:
    count = draw.integer(1, max_objects + 1)
    short = min(height, width)
    lo, hi = (math.log(f * short) for f in _RADIUS_RANGE)
    shapes = []
    for _ in range(count):
        cls = draw.integer(0, len(SHAPE_CLASSES))
        radius = math.exp(draw.uniform(lo, hi))
        cx, cy = draw.uniform(0, width), draw.uniform(0, height)
        angle = draw.uniform(0, 2 * math.pi)
        aspect = draw.uniform(*_ELLIPSE_ASPECT)  # drawn for every shape: the stream stays aligned
        shapes.append(_Shape(cls, cx, cy, radius, angle, aspect if SHAPE_CLASSES[cls] == "ellipse" else 1.0))
    return shapes


def _polygon(shape: _Shape) -> np.ndarray:
    """Vertices [k, 2] (x, y) of a polygonal shape."""
    name = SHAPE_CLASSES[shape.cls]
    if name == "square":
        angles, radii = np.arange(4) * (np.pi / 2) + np.pi / 4, np.full(4, shape.radius)
    elif name == "triangle":
        angles, radii = np.arange(3) * (2 * np.pi / 3) - np.pi / 2, np.full(3, shape.radius)
    elif name == "star":
        angles = np.arange(10) * (np.pi / 5) - np.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, shape.radius, shape.radius * _STAR_INNER)
    else:
        raise ValueError(f"{name} is not a polygon")
    angles = angles + shape.angle
    return np.stack([shape.cx + radii * np.cos(angles), shape.cy + radii * np.sin(angles)], axis=1)


def _rasterise(shape: _Shape, height: int, width: int) -> np.ndarray:
    """Boolean [H, W] mask of the pixels whose centre lies inside the shape (even-odd rule)."""
    mask = np.zeros((height, width), bool)
    r = shape.radius
    x0, x1 = max(math.floor(shape.cx - r), 0), min(math.ceil(shape.cx + r) + 1, width)
    y0, y1 = max(math.floor(shape.cy - r), 0), min(math.ceil(shape.cy + r) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return mask
    px = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5
    py = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5
    name = SHAPE_CLASSES[shape.cls]
    if name in ("circle", "ellipse"):
        c, s = math.cos(shape.angle), math.sin(shape.angle)
        u = (px - shape.cx) * c + (py - shape.cy) * s
        v = -(px - shape.cx) * s + (py - shape.cy) * c
        inside = (u / r) ** 2 + (v / (r * shape.aspect)) ** 2 <= 1.0
    else:
        verts = _polygon(shape)
        inside = np.zeros((y1 - y0, x1 - x0), bool)
        for (xa, ya), (xb, yb) in zip(verts, np.roll(verts, -1, axis=0)):
            straddles = (ya > py) != (yb > py)
            with np.errstate(divide="ignore", invalid="ignore"):
                x_cross = xa + (py - ya) * (xb - xa) / (yb - ya)
            inside ^= straddles & (px < x_cross)
    mask[y0:y1, x0:x1] = inside
    return mask


def _visible_masks(
    shapes: list[_Shape], height: int, width: int
) -> list[tuple[_Shape, np.ndarray, np.ndarray]]:
    """(shape, visible mask, full mask) of the kept shapes, bottom to top.

    One pass from the top shape down: a shape is hidden by the kept shapes above it; dropping a shape
    only uncovers shapes below it, so the kept shapes' visible areas stay above the thresholds."""
    covered = np.zeros((height, width), bool)
    kept = []
    for shape in reversed(shapes):
        full = _rasterise(shape, height, width)
        visible = full & ~covered
        area = int(visible.sum())
        if area < MIN_VISIBLE_AREA or area < MIN_VISIBLE_FRACTION * int(full.sum()):
            continue
        covered |= full
        kept.append((shape, visible, full))
    return [(shape, visible, full) for shape, visible, full in reversed(kept)]


# --------------------------------------------------------------------------------------------------
# Appearance
# --------------------------------------------------------------------------------------------------


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.asarray(rgb) * 255.0


def _background_colour(draw: _Draw, shift: bool) -> np.ndarray:
    if shift:  # dark, saturated
        return _hsv_to_rgb(draw.uniform(), draw.uniform(0.6, 1.0), draw.uniform(0.2, 0.55))
    return _hsv_to_rgb(draw.uniform(), draw.uniform(0.0, 0.25), draw.uniform(0.3, 0.75))  # greyish


def _shape_colour(draw: _Draw, shift: bool) -> np.ndarray:
    if shift:  # pale
        return _hsv_to_rgb(draw.uniform(), draw.uniform(0.1, 0.35), draw.uniform(0.8, 1.0))
    return _hsv_to_rgb(draw.uniform(), draw.uniform(0.6, 1.0), draw.uniform(0.55, 1.0))  # saturated


def _upsample_bilinear(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Corner-aligned bilinear upsampling of a small [gh, gw] grid to [H, W]."""
    gh, gw = grid.shape
    y = np.linspace(0, gh - 1, height)
    x = np.linspace(0, gw - 1, width)
    y0, x0 = np.minimum(y.astype(int), gh - 2), np.minimum(x.astype(int), gw - 2)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _pattern(draw: _Draw, kind: str, height: int, width: int) -> np.ndarray:
    """A [H, W] weight in [0, 1] that mixes two colours."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = draw.uniform(0, math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == "gradient":
        return (along - along.min()) / max(along.max() - along.min(), 1e-9)
    if kind == "blotches":
        cells = draw.integer(3, 7)
        return _upsample_bilinear(draw.uniform(size=(cells, cells)), height, width)
    if kind == "stripes":
        period = draw.uniform(4.0, 12.0)
        return (np.sin(2 * np.pi * along / period + draw.uniform(0, 2 * np.pi)) > 0).astype(np.float64)
    if kind == "checker":
        cell = draw.uniform(4.0, 12.0)
        across = -xx * math.sin(angle) + yy * math.cos(angle)
        return ((np.floor(along / cell) + np.floor(across / cell)) % 2).astype(np.float64)
    raise ValueError(f"unknown pattern {kind!r}")


def _two_tone(draw: _Draw, kind: str, colour: np.ndarray, other: np.ndarray, h: int, w: int) -> np.ndarray:
    weight = _pattern(draw, kind, h, w)[..., None]
    return colour * (1 - weight) + other * weight


def render_scene(
    seed: int, index: int, size: int | tuple[int, int] = 128, shift: bool = False, max_objects: int = 6
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Image `index` of the set `seed`: (uint8 [H, W, 3], [(class index 0..C-1, visible bool mask)])."""
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if height < 16 or width < 16:
        raise ValueError(f"synthetic images need both sides >= 16 pixels, got {height}x{width}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    geometry = _Draw(seed, index, _GEOMETRY_STREAM)
    look = _Draw(seed, index, _APPEARANCE_STREAM + int(shift))
    instances = _visible_masks(_sample_shapes(geometry, height, width, max_objects), height, width)

    kinds = ("stripes", "checker") if shift else ("gradient", "blotches")
    background = _two_tone(
        look,
        kinds[look.integer(0, 2)],
        _background_colour(look, shift),
        _background_colour(look, shift),
        height,
        width,
    )
    image = background
    for _shape, _visible, full in instances:
        colour = _shape_colour(look, shift)
        if shift:  # pale stripes: the colour and a darker shade of it
            fill = _two_tone(look, "stripes", colour, colour * 0.75, height, width)
        else:
            fill = np.broadcast_to(colour, (height, width, 3))
        image = np.where(full[..., None], fill, image)  # the full shape; shapes above overwrite it
    noise_std = 12.0 if shift else 5.0
    image = image + noise_std * look.normal((height, width, 3))
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image, [(shape.cls, visible) for shape, visible, _full in instances]


# --------------------------------------------------------------------------------------------------
# COCO format
# --------------------------------------------------------------------------------------------------


def _encode_rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _tight_box(mask: np.ndarray) -> list[int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    x, y = int(cols[0]), int(rows[0])
    return [x, y, int(cols[-1]) + 1 - x, int(rows[-1]) + 1 - y]


@dataclass(frozen=True)
class SyntheticSet:
    """A COCO-format dict (images, annotations, categories, info) and the images as uint8 HxWx3 arrays,
    `images[i]` belonging to `coco["images"][i]`."""

    coco: dict[str, Any]
    images: list[np.ndarray]


def make_synthetic(
    n: int, seed: int, size: int | tuple[int, int] = 128, shift: bool = False, *, max_objects: int = 6
) -> SyntheticSet:
    """`n` images (ids 1..n, file names `000000.png`...) with their instance annotations (ids from 1,
    RLE segmentations, iscrowd 0) and `categories()`."""
    if n < 0:
        raise ValueError(f"the number of images must be >= 0, got {n}")
    images, image_entries, annotations = [], [], []
    for index in range(n):
        image, instances = render_scene(seed, index, size, shift, max_objects)
        images.append(image)
        image_id = index + 1
        image_entries.append(
            {
                "id": image_id,
                "file_name": f"{index:06d}.png",
                "height": image.shape[0],
                "width": image.shape[1],
            }
        )
        for cls, mask in instances:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cls + 1,
                    "bbox": _tight_box(mask),
                    "area": int(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": _encode_rle(mask),
                }
            )
    info = {
        "description": "bob_jax synthetic shapes (bob_jax.detection.synthetic)",
        "version": FORMAT_VERSION,
        "seed": int(seed),
        "shift": bool(shift),
        "size": [int(s) for s in images[0].shape[:2]] if images else _size_hw(size),
        "max_objects": int(max_objects),
        "num_images": int(n),
    }
    coco = {"info": info, "images": image_entries, "annotations": annotations, "categories": categories()}
    return SyntheticSet(coco, images)


def _size_hw(size: int | tuple[int, int]) -> list[int]:
    return [int(size), int(size)] if isinstance(size, int) else [int(size[0]), int(size[1])]


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_coco_dataset(
    root: str | os.PathLike,
    split: str,
    n: int,
    seed: int,
    size: int | tuple[int, int] = 128,
    shift: bool = False,
    *,
    max_objects: int = 6,
) -> tuple[Path, Path]:
    """Write `make_synthetic(n, seed, size, shift)` as `<root>/<split>/images/<file_name>` (PNG) and
    `<root>/<split>/annotations.json`; returns (annotations.json, images directory).

    Every file is written atomically and annotations.json last, so its presence marks a complete set.
    A split whose annotations.json already records the same generator version and parameters, with all
    its images present, is left as it is (the content is a function of those parameters)."""
    from bob_jax.results import atomic_write_bytes

    split_dir = Path(root).expanduser() / split
    ann_path, image_dir = split_dir / "annotations.json", split_dir / "images"
    wanted = {
        "version": FORMAT_VERSION,
        "seed": int(seed),
        "shift": bool(shift),
        "size": _size_hw(size),
        "max_objects": int(max_objects),
        "num_images": int(n),
    }
    if ann_path.is_file():
        existing = json.loads(ann_path.read_text())
        info = existing.get("info", {})
        if all(info.get(k) == v for k, v in wanted.items()) and all(
            (image_dir / im["file_name"]).is_file() for im in existing["images"]
        ):
            return ann_path, image_dir
    data = make_synthetic(n, seed, size, shift, max_objects=max_objects)
    image_dir.mkdir(parents=True, exist_ok=True)
    for entry, image in zip(data.coco["images"], data.images):
        atomic_write_bytes(image_dir / entry["file_name"], _png_bytes(image))
    atomic_write_bytes(ann_path, json.dumps(data.coco, separators=(",", ":")).encode())
    return ann_path, image_dir
