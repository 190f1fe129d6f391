"""COCO evaluation: mask pasting, COCO result dicts and pycocotools' COCOeval (porting.md 13.4).

`paste_masks` is detectron2's `paste_masks_in_image`: the M x M mask probabilities cover the box
(x1, y1, x2, y2) continuously; image pixel (x, y) samples the mask at
    u = (x + 0.5 - x1) / (x2 - x1) * M - 0.5,   v = (y + 0.5 - y1) / (y2 - y1) * M - 0.5
bilinearly with zero padding (`F.grid_sample(..., align_corners=False, padding_mode='zeros')`), and the
result is thresholded with `>= threshold`. Bilinear sampling is separable, so each mask is pasted as
Wy @ mask @ Wx^T with two interpolation matrices (float64; only rows/columns whose sample lies inside
(-1, M) can be non-zero, the rest of the image stays 0). detectron2 on CPU only fills the box's
neighbourhood (`skip_empty`); after thresholding at 0.5 that is the same mask.

`to_coco_results` turns one image's detections (input-pixel boxes, contiguous classes) into COCO result
dicts (original-pixel xywh boxes, COCO category ids, RLE masks with str counts). `evaluate_coco` scores
them with COCOeval: the segm pass drops each result's 'bbox' (pycocotools' `loadRes` would otherwise take
the box area for the small/medium/large split, as detectron2's evaluator also avoids). Metrics are
fractions in [0, 1]; a size bucket without ground truth (COCOeval's -1) is reported as NaN; an empty
result list gives 0 for every metric. pycocotools is imported lazily and its prints are captured.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["METRIC_NAMES", "evaluate_coco", "load_coco", "paste_masks", "to_coco_results"]

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]
IOU_TYPES = ("bbox", "segm")


# --------------------------------------------------------------------------------------------------
# Mask pasting
# --------------------------------------------------------------------------------------------------


def _interpolation_matrix(start: float, stop: float, m: int, length: int) -> np.ndarray:
    """[length, m] bilinear weights of image pixels 0..length-1 sampling an m-cell axis spanning
    [start, stop] (align_corners=False, zero padding)."""
    extent = max(stop - start, np.finfo(np.float64).tiny)
    coord = (np.arange(length, dtype=np.float64) + 0.5 - start) / extent * m - 0.5
    lower = np.floor(coord)
    frac = coord - lower
    lower = lower.astype(np.int64)
    weights = np.zeros((length, m + 2), np.float64)  # columns: cell -1 .. m (the zero pads)
    rows = np.flatnonzero((coord > -1) & (coord < m))
    weights[rows, lower[rows] + 1] += 1 - frac[rows]
    weights[rows, lower[rows] + 2] += frac[rows]
    return weights[:, 1:-1]


def paste_masks(
    masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int], threshold: float | None = 0.5
) -> np.ndarray:
    """Paste [n, M, M] mask probabilities into [n, H, W] images at `boxes` [n, 4] (x1, y1, x2, y2).

    Returns uint8 0/1 masks (`prob >= threshold`), or the float32 pasted probabilities with
    `threshold=None`. Boxes without width or height give empty masks."""
    masks = np.asarray(masks, np.float64)
    boxes = np.asarray(boxes, np.float64)
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2]:
        raise ValueError(f"masks must be [n, M, M], got shape {masks.shape}")
    if boxes.shape != (len(masks), 4):
        raise ValueError(f"boxes must be [{len(masks)}, 4] to match the masks, got shape {boxes.shape}")
    height, width = int(image_hw[0]), int(image_hw[1])
    m = masks.shape[1]
    out = np.zeros((len(masks), height, width), np.float64)
    for i, (mask, (x1, y1, x2, y2)) in enumerate(zip(masks, boxes)):
        if not (x2 > x1 and y2 > y1):
            continue
        wy = _interpolation_matrix(y1, y2, m, height)
        wx = _interpolation_matrix(x1, x2, m, width)
        out[i] = wy @ mask @ wx.T
    if threshold is None:
        return out.astype(np.float32)
    return (out >= threshold).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# COCO result dicts
# --------------------------------------------------------------------------------------------------


def _encode_rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask[:, :, None].astype(np.uint8)))[0]
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def to_coco_results(
    image_id: int,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    masks: np.ndarray | None = None,
    *,
    scale: float | Sequence[float],
    category_ids: Sequence[int],
    valid: np.ndarray | None = None,
    image_hw: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """COCO result dicts of one image's detections.

    boxes [n, 4] (x1, y1, x2, y2) in network-input pixels are divided by `scale` (the transform's resize
    factor, or (scale_y, scale_x)) to original pixels and written as [x, y, w, h]; `classes` [n] are
    contiguous 0..C-1 and map to `category_ids[c]`; `valid` [n] drops padded detections (also those
    with class < 0). `masks`: full-image 0/1 masks [n, H, W] in original pixels, or, with `image_hw`
    (the original (H, W)), [n, M, M] probabilities pasted at the original-pixel boxes (threshold 0.5).
    Each dict has image_id, category_id, bbox, score and, with masks, segmentation (RLE, str counts).
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    classes = np.asarray(classes).reshape(-1).astype(np.int64)
    n = len(boxes)
    if len(scores) != n or len(classes) != n:
        raise ValueError(f"boxes, scores and classes disagree in length: {n}, {len(scores)}, {len(classes)}")
    keep = classes >= 0 if valid is None else np.asarray(valid, bool).reshape(-1) & (classes >= 0)
    if len(keep) != n:
        raise ValueError(f"valid has {len(keep)} entries for {n} detections")
    category_ids = [int(c) for c in category_ids]
    if keep.any() and classes[keep].max() >= len(category_ids):
        raise ValueError(
            f"class {int(classes[keep].max())} has no COCO category: category_ids has "
            f"{len(category_ids)} entries"
        )
    scale_y, scale_x = (
        (float(scale), float(scale)) if np.ndim(scale) == 0 else (float(scale[0]), float(scale[1]))
    )
    orig = boxes / np.asarray([scale_x, scale_y, scale_x, scale_y])
    kept = np.flatnonzero(keep)
    if masks is not None:
        masks = np.asarray(masks)
        if len(masks) != n:
            raise ValueError(f"{len(masks)} masks for {n} detections")
        masks = masks[kept]
        if image_hw is not None:
            masks = paste_masks(masks, orig[kept], image_hw)
    results = []
    for j, i in enumerate(kept):
        x1, y1, x2, y2 = (float(v) for v in orig[i])
        result = {
            "image_id": int(image_id),
            "category_id": category_ids[classes[i]],
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(scores[i]),
        }
        if masks is not None:
            result["segmentation"] = _encode_rle(masks[j])
        results.append(result)
    return results


# --------------------------------------------------------------------------------------------------
# COCOeval
# --------------------------------------------------------------------------------------------------


def load_coco(coco_gt: Any):
    """A pycocotools COCO object from a COCO object, a dict, or a path to an annotation json."""
    from pycocotools.coco import COCO

    if isinstance(coco_gt, COCO):
        return coco_gt
    if isinstance(coco_gt, (str, os.PathLike)):
        with open(coco_gt) as f:
            coco_gt = json.load(f)
    if not isinstance(coco_gt, dict):
        raise TypeError(
            f"coco_gt must be a pycocotools COCO, a COCO-format dict or a json path, got {type(coco_gt)}"
        )
    coco = COCO()
    coco.dataset = copy.deepcopy(coco_gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _result_view(results: list[dict[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    if iou_type == "bbox":
        return [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    missing = sum("segmentation" not in r for r in results)
    if missing:
        raise ValueError(
            f"{missing} results have no 'segmentation'; segm AP needs masks (or iou_types=('bbox',))"
        )
    return [{k: v for k, v in r.items() if k != "bbox"} for r in results]


def evaluate_coco(
    coco_gt: Any,
    results: Iterable[dict[str, Any]],
    iou_types: Sequence[str] = IOU_TYPES,
    img_ids: Sequence[int] | None = None,
) -> dict[str, dict[str, float]]:
    """{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl"}} of COCO-format results against the
    ground truth (a COCO object, dict or json path), over `img_ids` (default: every GT image; images
    without detections count their objects as misses)."""
    from pycocotools.cocoeval import COCOeval

    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown:
        raise ValueError(f"iou_types {unknown} are not among {IOU_TYPES}")
    gt = load_coco(coco_gt)
    # pycocotools 2.0.10's loadRes copies the GT's 'info', which converted sets (Cityscapes, Sim10k) lack.
    gt.dataset.setdefault("info", {})
    results = list(results)
    gt_images = set(gt.getImgIds())
    stray = sorted({int(r["image_id"]) for r in results} - gt_images)
    if stray:
        raise ValueError(f"results name image ids not in the ground truth: {stray[:10]}")
    if "segm" in iou_types and any("segmentation" not in a for a in gt.dataset.get("annotations", [])):
        raise ValueError(
            "the ground truth has annotations without 'segmentation'; evaluate iou_types=('bbox',)"
        )
    metrics = {}
    for iou_type in iou_types:
        if not results:
            metrics[iou_type] = dict.fromkeys(METRIC_NAMES, 0.0)
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(_result_view(results, iou_type))
            evaluator = COCOeval(gt, dt, iou_type)
            if img_ids is not None:
                evaluator.params.imgIds = sorted(int(i) for i in img_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = evaluator.stats[: len(METRIC_NAMES)]
        metrics[iou_type] = {k: (float(v) if v >= 0 else math.nan) for k, v in zip(METRIC_NAMES, stats)}
    return metrics
