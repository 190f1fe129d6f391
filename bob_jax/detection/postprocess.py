"""Test-time detections of an R-CNN box head with fixed shapes (detectron2 `fast_rcnn_inference`).

Per image: softmax class probabilities without the background column, every (RoI, class) pair a
candidate with its class's decoded box (or the one class-agnostic box) clipped to the image,
candidates with a probability > `score_thresh` kept, non-maximum suppression per class, and the
`max_detections` best survivors in descending score order. Variable-length results become
fixed-size arrays with a `valid` mask: `boxes [B, D, 4]`, `scores [B, D]`, `classes [B, D]` (-1
where invalid), `valid [B, D]`. Masks for the kept detections are the sigmoid of the mask head's
channel for the detected class (`mask_probabilities`); pasting them into the image is
`coco_eval.paste_masks`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bob_jax import ops


def _detect_one(probs, boxes, valid, image_size, score_thresh, nms_thresh, max_detections, max_candidates):
    num_rois, num_classes = probs.shape[0], probs.shape[1] - 1
    # Non-finite rows are dropped as detectron2 does; zeroing them keeps NaNs out of the IoUs.
    finite = jnp.all(jnp.isfinite(probs), axis=-1) & jnp.all(jnp.isfinite(boxes), axis=(-2, -1))
    valid = valid & finite
    scores = jnp.where(valid[:, None], probs[:, :num_classes], 0.0)
    boxes = ops.clip_boxes(jnp.where(valid[:, None, None], boxes, 0.0), image_size)
    boxes = jnp.broadcast_to(boxes, (num_rois, num_classes, 4))
    keep = valid[:, None] & (scores > score_thresh)

    scores, boxes, keep = scores.reshape(-1), boxes.reshape(-1, 4), keep.reshape(-1)
    classes = jnp.tile(jnp.arange(num_classes, dtype=jnp.int32), num_rois)
    if max_candidates is not None and max_candidates < scores.shape[0]:
        # Bounds the NMS input for many classes; exact as long as at most `max_candidates`
        # candidates pass the score threshold (then the dropped ones are all below it).
        _, top = jax.lax.top_k(jnp.where(keep, scores, -1.0), max_candidates)
        scores, boxes, keep, classes = scores[top], boxes[top], keep[top], classes[top]

    kept = ops.batched_nms(boxes, scores, classes, nms_thresh, max_detections, valid=keep)
    det_valid = kept >= 0
    idx = jnp.maximum(kept, 0)
    return {
        "boxes": jnp.where(det_valid[:, None], boxes[idx], 0.0),
        "scores": jnp.where(det_valid, scores[idx], 0.0),
        "classes": jnp.where(det_valid, classes[idx], -1),
        "valid": det_valid,
    }


def detect(
    probs: jax.Array,
    boxes: jax.Array,
    valid: jax.Array,
    image_sizes: jax.Array,
    *,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    max_detections: int = 100,
    max_candidates: int | None = None,
) -> dict[str, jax.Array]:
    """Detections from per-RoI class probabilities and decoded boxes.

    probs: [B, R, C+1] softmax probabilities, background last; boxes: [B, R, C, 4] class-specific or
    [B, R, 1, 4] class-agnostic decoded boxes; valid: [B, R] which RoIs exist; image_sizes: [B, 2]
    (height, width). `max_candidates` (None: all R*C candidates) pre-selects the best-scoring
    candidates before NMS; the result is unchanged unless more than that many pass `score_thresh`.
    Returns `boxes [B, D, 4]`, `scores [B, D]`, `classes [B, D]` int32 (-1 padding), `valid [B, D]`
    with D = `max_detections`, in descending score order per image.
    """
    if probs.ndim != 3 or boxes.ndim != 4 or boxes.shape[-1] != 4:
        raise ValueError(
            "detect expects probs [B, R, C+1] and boxes [B, R, C or 1, 4]; "
            f"got {probs.shape} and {boxes.shape}"
        )
    num_classes = probs.shape[-1] - 1
    if boxes.shape[2] not in (1, num_classes) or boxes.shape[:2] != probs.shape[:2]:
        raise ValueError(
            f"boxes {boxes.shape} do not fit probs {probs.shape}: need [B, R, {num_classes}, 4] "
            "(class-specific) or [B, R, 1, 4] (class-agnostic)"
        )

    def one(p, b, v, s):
        return _detect_one(p, b, v, s, score_thresh, nms_thresh, max_detections, max_candidates)

    return jax.vmap(one)(probs, boxes, valid.astype(bool), image_sizes)


def mask_probabilities(mask_logits: jax.Array, classes: jax.Array) -> jax.Array:
    """Per-detection mask probabilities: sigmoid of the channel of the detected class.

    mask_logits: [B, D, M, M, C] (class-specific) or [B, D, M, M, 1] (class-agnostic); classes:
    [B, D] (-1 padding gives channel 0, masked by the caller's `valid`). Returns [B, D, M, M].
    """
    channel = jnp.zeros_like(classes) if mask_logits.shape[-1] == 1 else jnp.maximum(classes, 0)
    picked = jnp.take_along_axis(mask_logits, channel[:, :, None, None, None], axis=-1)[..., 0]
    return jax.nn.sigmoid(picked)
