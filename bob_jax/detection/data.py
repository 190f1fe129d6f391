"""Detection data: a COCO-format source and fixed-shape train/test transforms (grain maps).

Source. `CocoDetection(ann_json, image_dir)` reads any COCO-format instance set through pycocotools
(imported lazily): COCO 2017 (category ids 1..90, 80 used), Cityscapes and Sim10k converted to COCO
format (select the single class with `category_names=("car",)`), the synthetic shapes
(`bob_jax.detection.synthetic`). Item i (images sorted by id) is
  {"image": uint8 [H, W, 3] RGB, "boxes": float32 [n, 4] (x1, y1, x2, y2), "classes": int32 [n] in 0..C-1,
   "masks": uint8 [n, H, W] (with_masks=True), "image_id": int}.
Training targets follow mmdetection's `CocoDataset._parse_ann_info` (the original's loader): crowd
annotations (`iscrowd=1`) are left out (COCOeval still reads them from the json as ignore regions), and
so are annotations with area <= 0, width or height < 1, or a category outside the selection. Images
carry EXIF orientation applied (PIL `exif_transpose`, as detectron2) and must match the json's size.
Masks are decoded from polygons, uncompressed or compressed RLE.

Transforms produce one fixed-shape example (the detection contract: every array padded, validity by
masks), as grain `RandomMap` (train) or `Map` (test):
  {"image": uint8 [S, S, 3] (zero padded), "image_size": int32 [2] valid (h, w),
   "gt_boxes": float32 [G, 4], "gt_classes": int32 [G] (-1 = padding), "gt_masks": uint8 [G, S, S]
   (with_masks=True), "image_id": int64, "scale": float32 (resize factor: original -> input pixels),
   "orig_size": int32 [2] (original h, w), "num_truncated": int32 (instances beyond G, dropped)}.
Padding is uint8 zero before normalisation: the model must zero the padded region again after mean/std
normalisation (detectron2 pads normalised images with 0) using `image_size`.
  `LSJ(size, scale=(0.1, 2.0))`   detectron2's large-scale jitter (`coco_loader_lsj.py`): RandomFlip ->
                                  ResizeScale (fit inside size*scale x size*scale, aspect kept) ->
                                  FixedSizeCrop(size) at a random offset -> zero pad to size.
  `MultiScaleResize(short_sides, max_size)`  the original's CNN/Swin recipe (mmdet `Resize(img_scale=
                                  [(max_size, s) for s in short_sides], multiscale_mode='value',
                                  keep_ratio=True)` + `RandomFlip(0.5)`), zero pad to `pad_size`.
  `TestResize(size, short_side=None)`  deterministic: shorter side to `short_side` (default `size`),
                                  longer side at most `size`; zero pad to `pad_size`.
Geometry: boxes in pixel-edge coordinates (no +1). Flip: x -> W - x. Resize to (h', w'): x * w'/w,
y * h'/h; images with PIL BILINEAR (antialiased when shrinking, as detectron2's ResizeTransform; mmdet's
cv2 resize does not antialias), masks with NEAREST (output pixel i reads source pixel
floor((i + 0.5) * in / out), as detectron2/mmdet resize bitmaps). The box of an enlarged mask is then
the transformed box within 1/2 px; shrinking never grows a mask past that, but may skip parts thinner
than the sampling step (shape tips: up to ~2 px short on the synthetic shapes at scales 0.1-0.9).
Crop: boxes shifted and clipped to the valid region, and a box the crop cuts is tightened to its
cropped mask (clipping alone keeps covering the part of the object cut away; mmdet's LSJ
`RandomCrop(recompute_bbox=True)` recomputes every box from its mask, we keep uncut boxes exact);
instances whose box has no area (<= 1e-5) or whose mask is empty afterwards are removed (detectron2
`filter_empty_instances`). More than G instances: the first G (json order) are kept and
`num_truncated` counts the rest (also logged once per transform and process).

Randomness: inside grain, `random_map(element, rng)` draws from grain's per-element generator (seeded
from the dataset seed and the element index, so epochs of `repeat()` differ). Outside grain,
`transform.apply(example, seed=, index=, epoch=)` uses `example_rng(seed, index, epoch)` (PCG64 from
`SeedSequence([seed, index, epoch])`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

__all__ = [
    "LSJ",
    "CocoDetection",
    "MultiScaleResize",
    "TestResize",
    "crop_example",
    "example_rng",
    "hflip_example",
    "pack_example",
    "resize_example",
]

_log = logging.getLogger(__name__)

_EMPTY_BOX = 1e-5  # detectron2 `Boxes.nonempty(threshold=1e-5)`


def _quiet_coco(ann_json: Path):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints loading progress
        return COCO(str(ann_json))


# --------------------------------------------------------------------------------------------------
# Source
# --------------------------------------------------------------------------------------------------


class CocoDetection:
    """A COCO-format instance set as a random-access source (see the module docstring).

    `category_ids` (COCO ids) or `category_names` select a subset of the categories; either way the
    classes are numbered 0..C-1 in ascending COCO id. `with_masks=False` skips mask decoding (box-only sets such
    as Sim10k). `filter_empty=True` drops images without any training instance, as detectron2's and
    mmdet's training loaders do; keep the default False for evaluation (such images still count).
    """

    def __init__(
        self,
        ann_json: str | os.PathLike,
        image_dir: str | os.PathLike,
        *,
        category_ids: Sequence[int] | None = None,
        category_names: Sequence[str] | None = None,
        with_masks: bool = True,
        filter_empty: bool = False,
    ):
        self.ann_json = Path(ann_json).expanduser()
        self.image_dir = Path(image_dir).expanduser()
        if not self.ann_json.is_file():
            raise FileNotFoundError(
                f"COCO annotation file {str(self.ann_json)!r} does not exist; pass the instances json "
                "(e.g. annotations/instances_val2017.json) or write the synthetic set with "
                "bob_jax.detection.synthetic.write_coco_dataset"
            )
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image directory {str(self.image_dir)!r} does not exist")
        if category_ids is not None and category_names is not None:
            raise ValueError("pass category_ids or category_names, not both")
        self.with_masks, self.filter_empty = bool(with_masks), bool(filter_empty)
        coco = self.coco
        all_cats = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
        if category_names is not None:
            by_name = {name: cid for cid, name in all_cats.items()}
            unknown = [n for n in category_names if n not in by_name]
            if unknown:
                raise ValueError(
                    f"categories {unknown} are not in {self.ann_json.name}; it has {sorted(by_name)}"
                )
            category_ids = [by_name[n] for n in category_names]
        if category_ids is not None:
            unknown = [c for c in category_ids if c not in all_cats]
            if unknown:
                raise ValueError(
                    f"category ids {unknown} are not in {self.ann_json.name}; it has {sorted(all_cats)}"
                )
            if len(set(category_ids)) != len(category_ids):
                raise ValueError(f"category ids repeat: {list(category_ids)}")
        ids = sorted(category_ids if category_ids is not None else all_cats)
        if not ids:
            raise ValueError(f"{self.ann_json} defines no categories")
        self.contiguous_to_coco = tuple(int(c) for c in ids)
        self.coco_to_contiguous = {c: i for i, c in enumerate(self.contiguous_to_coco)}
        self.class_names = tuple(all_cats[c] for c in ids)
        self.num_classes = len(ids)
        image_ids = sorted(coco.getImgIds())
        if self.filter_empty:
            image_ids = [i for i in image_ids if self._annotations(i)]
        self.image_ids = tuple(image_ids)

    @property
    def coco(self):
        """The pycocotools COCO object (loaded on first use; not pickled)."""
        if getattr(self, "_coco", None) is None:
            self._coco = _quiet_coco(self.ann_json)
        return self._coco

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_coco"] = None  # grain workers re-read the json instead of unpickling the index
        return state

    def __len__(self) -> int:
        return len(self.image_ids)

    def _annotations(self, image_id: int) -> list[dict[str, Any]]:
        """Training instances of an image (mmdet's rules: no crowd, area > 0, w and h >= 1)."""
        coco = self.coco
        out = []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            _x, _y, w, h = ann["bbox"]
            if ann.get("iscrowd", 0) or ann["category_id"] not in self.coco_to_contiguous:
                continue
            if ann.get("area", w * h) <= 0 or w < 1 or h < 1:
                continue
            out.append(ann)
        return out

    def _load_image(self, info: dict[str, Any]) -> np.ndarray:
        from PIL import Image, ImageOps

        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(
                f"image {str(path)!r} (image id {info['id']}) listed in {self.ann_json.name} is missing; "
                "check image_dir"
            )
        with Image.open(path) as im:
            image = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        if image.shape[:2] != (info["height"], info["width"]):
            raise ValueError(
                f"image {str(path)!r} is {image.shape[0]}x{image.shape[1]} but {self.ann_json.name} says "
                f"{info['height']}x{info['width']}; the image and annotation files do not belong together"
            )
        return image

    def _decode_mask(self, ann: dict[str, Any], height: int, width: int) -> np.ndarray:
        from pycocotools import mask as mask_util

        seg = ann.get("segmentation")
        if not seg:
            raise ValueError(
                f"annotation {ann.get('id')} has no segmentation; for a box-only set use with_masks=False"
            )
        if isinstance(seg, list):  # polygons
            rle = mask_util.merge(mask_util.frPyObjects(seg, height, width))
        elif isinstance(seg["counts"], list):  # uncompressed RLE
            rle = mask_util.frPyObjects(seg, height, width)
        else:
            rle = seg
        return mask_util.decode(rle)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.image_ids[int(index)]
        info = self.coco.loadImgs([image_id])[0]
        image = self._load_image(info)
        anns = self._annotations(image_id)
        boxes = np.asarray([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        classes = np.asarray([self.coco_to_contiguous[a["category_id"]] for a in anns], np.int32)
        example = {"image": image, "boxes": boxes, "classes": classes, "image_id": int(image_id)}
        if self.with_masks:
            h, w = image.shape[:2]
            masks = [self._decode_mask(a, h, w) for a in anns]
            example["masks"] = np.stack(masks) if masks else np.zeros((0, h, w), np.uint8)
        return example

    def describe(self) -> dict[str, Any]:
        return {
            "name": f"coco:{self.ann_json}",
            "size": len(self),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "category_ids": list(self.contiguous_to_coco),
            "origin": {
                "ann_json": str(self.ann_json),
                "ann_json_sha256": hashlib.sha256(self.ann_json.read_bytes()).hexdigest(),
                "image_dir": str(self.image_dir),
                "filter_empty": self.filter_empty,
            },
            "subset": None,
        }


# --------------------------------------------------------------------------------------------------
# Functional transforms on examples {"image", "boxes", "classes", ["masks"], "image_id"}
# --------------------------------------------------------------------------------------------------


def example_rng(seed: int, index: int, epoch: int = 0) -> np.random.Generator:
    """The generator of one example in one epoch."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(index), int(epoch)])))


def hflip_example(example: dict[str, Any]) -> dict[str, Any]:
    out = dict(example)
    width = example["image"].shape[1]
    out["image"] = np.ascontiguousarray(example["image"][:, ::-1])
    boxes = example["boxes"]
    out["boxes"] = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
    if "masks" in example:
        out["masks"] = np.ascontiguousarray(example["masks"][:, :, ::-1])
    return out


def _nearest_index(out_len: int, in_len: int, start: int = 0, count: int | None = None) -> np.ndarray:
    """Source indices of output pixels start..start+count of a nearest resize from in_len to out_len."""
    count = out_len - start if count is None else count
    i = np.arange(start, start + count, dtype=np.float64)
    return np.minimum(np.floor((i + 0.5) * in_len / out_len).astype(np.int64), in_len - 1)


def _resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def resize_example(example: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """Resize image (bilinear), boxes (scaled) and masks (nearest) to height x width."""
    h, w = example["image"].shape[:2]
    out = dict(example)
    out["image"] = _resize_image(example["image"], height, width)
    factors = np.asarray([width / w, height / h, width / w, height / h], np.float32)
    out["boxes"] = (example["boxes"] * factors).astype(np.float32)
    if "masks" in example:
        rows, cols = _nearest_index(height, h), _nearest_index(width, w)
        out["masks"] = example["masks"][:, rows][:, :, cols]
    return out


def _remove_empty(example: dict[str, Any]) -> dict[str, Any]:
    boxes = example["boxes"]
    keep = ((boxes[:, 2] - boxes[:, 0]) > _EMPTY_BOX) & ((boxes[:, 3] - boxes[:, 1]) > _EMPTY_BOX)
    if "masks" in example:
        keep &= example["masks"].reshape(len(boxes), -1).any(axis=1)
    out = dict(example)
    for key in ("boxes", "classes", "masks"):
        if key in example:
            out[key] = example[key][keep]
    return out


def _mask_boxes(masks: np.ndarray) -> np.ndarray:
    """[n, 4] pixel-edge boxes of [n, H, W] masks (empty masks give an empty box at 0)."""
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    h, w = masks.shape[1:]
    x1, y1 = np.argmax(cols, axis=1), np.argmax(rows, axis=1)
    x2, y2 = w - np.argmax(cols[:, ::-1], axis=1), h - np.argmax(rows[:, ::-1], axis=1)
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
    boxes[~cols.any(axis=1)] = 0
    return boxes


def _cropped_targets(example: dict[str, Any], shifted_boxes: np.ndarray) -> dict[str, Any]:
    """Clip boxes (in crop coordinates) to the cropped image; boxes cut by the crop are tightened to
    their cropped mask (the clipped box would still cover the part of the object cut away); drop
    instances left empty."""
    h, w = example["image"].shape[:2]
    limits = np.asarray([w, h, w, h], np.float32)
    boxes = np.clip(shifted_boxes, 0, limits).astype(np.float32)
    if "masks" in example and len(boxes):
        cut = (shifted_boxes[:, :2] < 0).any(axis=1) | (shifted_boxes[:, 2:] > limits[2:]).any(axis=1)
        tight = _mask_boxes(example["masks"][cut])
        boxes[cut, :2] = np.maximum(boxes[cut, :2], tight[:, :2])
        boxes[cut, 2:] = np.minimum(boxes[cut, 2:], tight[:, 2:])
    return _remove_empty({**example, "boxes": boxes})


def crop_example(example: dict[str, Any], top: int, left: int, height: int, width: int) -> dict[str, Any]:
    """Crop to rows top..top+height, cols left..left+width (inside the image); boxes shifted and
    clipped (tightened to the mask where the crop cuts them), instances left without box area or mask
    pixels removed."""
    out = dict(example)
    out["image"] = example["image"][top : top + height, left : left + width]
    if "masks" in example:
        out["masks"] = example["masks"][:, top : top + height, left : left + width]
    return _cropped_targets(out, example["boxes"] - np.asarray([left, top, left, top], np.float32))


def _resize_and_crop(
    example: dict[str, Any], height: int, width: int, top: int, left: int, crop_h: int, crop_w: int
) -> dict[str, Any]:
    """`crop_example(resize_example(example, height, width), top, left, crop_h, crop_w)`, resizing the
    masks only inside the crop."""
    h, w = example["image"].shape[:2]
    image = _resize_image(example["image"], height, width)[top : top + crop_h, left : left + crop_w]
    ch, cw = image.shape[:2]
    boxes = (
        example["boxes"] * np.asarray([width / w, height / h, width / w, height / h], np.float32)
    ).astype(np.float32)
    out = {**example, "image": image}
    if "masks" in example:
        rows, cols = _nearest_index(height, h, top, ch), _nearest_index(width, w, left, cw)
        out["masks"] = example["masks"][:, rows][:, :, cols]
    return _cropped_targets(out, boxes - np.asarray([left, top, left, top], np.float32))


def pack_example(
    example: dict[str, Any],
    pad_size: int,
    max_instances: int,
    scale: float,
    orig_size: tuple[int, int],
) -> dict[str, Any]:
    """Zero-pad to pad_size x pad_size and pad the instances to max_instances (classes -1)."""
    image = example["image"]
    h, w = image.shape[:2]
    if h > pad_size or w > pad_size:
        raise ValueError(
            f"a {h}x{w} image does not fit the {pad_size}x{pad_size} padded frame; raise pad_size"
        )
    n = len(example["classes"])
    keep = min(n, max_instances)
    padded = np.zeros((pad_size, pad_size, 3), np.uint8)
    padded[:h, :w] = image
    gt_boxes = np.zeros((max_instances, 4), np.float32)
    gt_boxes[:keep] = example["boxes"][:keep]
    gt_classes = np.full((max_instances,), -1, np.int32)
    gt_classes[:keep] = example["classes"][:keep]
    out = {
        "image": padded,
        "image_size": np.asarray([h, w], np.int32),
        "gt_boxes": gt_boxes,
        "gt_classes": gt_classes,
        "image_id": np.int64(example["image_id"]),
        "scale": np.float32(scale),
        "orig_size": np.asarray(orig_size, np.int32),
        "num_truncated": np.int32(n - keep),
    }
    if "masks" in example:
        gt_masks = np.zeros((max_instances, pad_size, pad_size), np.uint8)
        gt_masks[:keep, :h, :w] = example["masks"][:keep]
        out["gt_masks"] = gt_masks
    return out


def _fit_scale(h: int, w: int, short_side: float, max_size: float) -> float:
    """detectron2 ResizeShortestEdge / mmdet keep-ratio rescale: the shorter side to `short_side`
    unless the longer side would exceed `max_size`."""
    return min(short_side / min(h, w), max_size / max(h, w))


def _scaled(length: int, scale: float) -> int:
    return int(length * scale + 0.5)  # round half up, as detectron2 and mmdet


# --------------------------------------------------------------------------------------------------
# grain transforms
# --------------------------------------------------------------------------------------------------


class _FixedShape:
    """Shared checks, padding and the truncation warning of the fixed-shape transforms."""

    def _init_common(self, pad_size: int, max_instances: int) -> None:
        if pad_size <= 0 or max_instances <= 0:
            raise ValueError(f"pad_size and max_instances must be positive, got {pad_size}, {max_instances}")
        self.pad_size, self.max_instances = int(pad_size), int(max_instances)
        self._warned = False

    def _pack(self, example, scale: float, orig_size) -> dict[str, Any]:
        out = pack_example(example, self.pad_size, self.max_instances, scale, orig_size)
        if out["num_truncated"] and not self._warned:
            self._warned = True
            _log.warning(
                "image %d has %d instances, more than max_instances=%d: %d dropped (later ones are counted "
                "in 'num_truncated', not logged)",
                out["image_id"], len(example["classes"]), self.max_instances, int(out["num_truncated"]),
            )  # fmt: skip
        return out

    def apply(self, example: dict[str, Any], *, seed: int, index: int, epoch: int = 0) -> dict[str, Any]:
        """The transform with the example's own generator (outside grain; test transforms ignore it)."""
        if isinstance(self, grain.transforms.RandomMap):
            return self.random_map(example, example_rng(seed, index, epoch))
        return self.map(example)


def _check_example(example: dict[str, Any]) -> None:
    image = example["image"]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")


class LSJ(_FixedShape, grain.transforms.RandomMap):
    """Large-scale jitter (detectron2 ResizeScale + FixedSizeCrop; the original's ViT recipe).

    With probability `flip_p` mirror; draw s ~ U(scale); resize by r = min(s*size/h, s*size/w) to
    (round(h*r), round(w*r)); crop size x size at offsets round(U(0,1) * max(resized - size, 0)), drawn
    per axis as mmdet's RandomCrop (detectron2's FixedSizeCrop uses one uniform for both axes); pad."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.1, 2.0),
        *,
        max_instances: int = 100,
        flip_p: float = 0.5,
    ):
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"LSJ needs 0 < min <= max scale, got {scale}")
        if not 0 <= flip_p <= 1:
            raise ValueError(f"flip probability must lie in [0, 1], got {flip_p}")
        self._init_common(size, max_instances)
        self.size, self.scale, self.flip_p = int(size), (float(scale[0]), float(scale[1])), float(flip_p)

    def random_map(self, example, rng: np.random.Generator):
        _check_example(example)
        h, w = example["image"].shape[:2]
        if rng.random() < self.flip_p:
            example = hflip_example(example)
        s = rng.uniform(*self.scale)
        r = min(s * self.size / h, s * self.size / w)
        new_h, new_w = max(round(h * r), 1), max(round(w * r), 1)  # half to even, as np.round
        top = round(max(new_h - self.size, 0) * rng.random())
        left = round(max(new_w - self.size, 0) * rng.random())
        out = _resize_and_crop(example, new_h, new_w, top, left, self.size, self.size)
        return self._pack(out, r, (h, w))


class MultiScaleResize(_FixedShape, grain.transforms.RandomMap):
    """The original's multi-scale training resize for CNN/Swin backbones: a shorter side drawn from
    `short_sides`, the longer side capped at `max_size` (aspect kept), random flip, zero pad."""

    def __init__(
        self,
        short_sides: Sequence[int] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
        max_size: int = 1333,
        *,
        pad_size: int | None = None,
        max_instances: int = 100,
        flip_p: float = 0.5,
    ):
        if not short_sides or min(short_sides) <= 0 or max_size <= 0:
            raise ValueError(f"need positive short_sides and max_size, got {short_sides}, {max_size}")
        self._init_common(pad_size or 32 * math.ceil(max_size / 32), max_instances)
        self.short_sides, self.max_size, self.flip_p = (
            tuple(int(s) for s in short_sides),
            int(max_size),
            flip_p,
        )

    def random_map(self, example, rng: np.random.Generator):
        _check_example(example)
        h, w = example["image"].shape[:2]
        short = self.short_sides[int(rng.integers(len(self.short_sides)))]
        r = _fit_scale(h, w, short, self.max_size)
        out = resize_example(example, _scaled(h, r), _scaled(w, r))
        if rng.random() < self.flip_p:
            out = hflip_example(out)
        return self._pack(_remove_empty(out), r, (h, w))


class TestResize(_FixedShape, grain.transforms.Map):
    """Test-time resize: shorter side to `short_side` (default `size`, i.e. the longer side to `size`),
    the longer side at most `size`; zero pad to `pad_size` (default `size` rounded up to 32)."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        size: int,
        short_side: int | None = None,
        *,
        pad_size: int | None = None,
        max_instances: int = 100,
    ):
        self._init_common(pad_size or 32 * math.ceil(size / 32), max_instances)
        self.size, self.short_side = int(size), int(short_side or size)

    def map(self, example):
        _check_example(example)
        h, w = example["image"].shape[:2]
        r = _fit_scale(h, w, self.short_side, self.size)
        out = resize_example(example, _scaled(h, r), _scaled(w, r))
        return self._pack(_remove_empty(out), r, (h, w))
