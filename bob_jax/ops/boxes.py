"""Box utilities on (x1, y1, x2, y2) boxes in absolute coordinates (no legacy +1: width = x2 - x1).

Formulas follow torchvision.ops (``box_area``, ``box_iou``, ``generalized_box_iou``,
``clip_boxes_to_image``) so that parity tests can compare value for value. As in torchvision, a pair of
empty boxes has IoU 0 / 0 = NaN; NaN compares False, so NMS never suppresses with it. Callers that need a
finite loss (GIoU) on degenerate boxes must mask them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["box_area", "box_iou", "clip_boxes", "generalized_box_iou"]


def _check_boxes(boxes: jax.Array, name: str) -> None:
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [..., 4] as (x1, y1, x2, y2), got {boxes.shape}")


@jax.jit
def box_area(boxes: jax.Array) -> jax.Array:
    """[..., 4] -> [...]: (x2 - x1) * (y2 - y1) (negative for inverted boxes, as torchvision)."""
    _check_boxes(boxes, "boxes")
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _inter_union(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
    return inter, union


@jax.jit
def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Pairwise IoU: a [..., N, 4], b [..., M, 4] -> [..., N, M]."""
    _check_boxes(a, "a")
    _check_boxes(b, "b")
    inter, union = _inter_union(a, b)
    return inter / union


@jax.jit
def generalized_box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Pairwise generalised IoU (Rezatofighi et al. 2019): IoU - (|C| - |A u B|) / |C|, C the enclosing box.

    a [..., N, 4], b [..., M, 4] -> [..., N, M], values in [-1, 1] for valid boxes.
    """
    _check_boxes(a, "a")
    _check_boxes(b, "b")
    inter, union = _inter_union(a, b)
    lt = jnp.minimum(a[..., :, None, :2], b[..., None, :, :2])
    rb = jnp.maximum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    enclosing = wh[..., 0] * wh[..., 1]
    return inter / union - (enclosing - union) / enclosing


@jax.jit
def clip_boxes(boxes: jax.Array, image_size) -> jax.Array:
    """Clip x to [0, width] and y to [0, height].

    ``image_size`` is (height, width) -- a pair, or an array [..., 2] that broadcasts against
    ``boxes.shape[:-1]`` (e.g. ``image_sizes[:, None, :]`` for boxes [B, R, 4] and image_sizes [B, 2]).
    """
    _check_boxes(boxes, "boxes")
    size = jnp.asarray(image_size, dtype=boxes.dtype)
    if size.shape[-1:] != (2,):
        raise ValueError(f"image_size must be (height, width) or [..., 2], got shape {size.shape}")
    height, width = size[..., 0], size[..., 1]
    x1 = jnp.clip(boxes[..., 0], 0, width)
    y1 = jnp.clip(boxes[..., 1], 0, height)
    x2 = jnp.clip(boxes[..., 2], 0, width)
    y2 = jnp.clip(boxes[..., 3], 0, height)
    return jnp.stack([x1, y1, x2, y2], axis=-1)
