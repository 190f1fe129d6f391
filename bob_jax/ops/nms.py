"""Greedy non-maximum suppression with fixed-size outputs (jit- and vmap-friendly).

Semantics are torchvision's ``nms`` / ``batched_nms``: boxes are visited in descending score order; a box
is kept unless a kept box of the same class overlaps it with IoU > ``iou_threshold`` (strictly greater,
IoU without the legacy +1). The result is the kept indices in descending score order, truncated to
``max_output`` and padded with -1. Exact score ties are visited in index order (torchvision's sort is not
stable there, so tied inputs may legitimately differ).

``batched_nms`` masks the IoU between boxes of different classes instead of using torchvision's
coordinate-offset trick: the result equals per-class NMS exactly (torchvision's ``_batched_nms_vanilla``),
whereas the offset trick shifts boxes by class * (max coordinate + 1) and can change IoUs by float32
rounding at large offsets.

Algorithm (exact greedy, O(N * tile) memory): boxes are sorted and cut into tiles of ``tile_size``. Tile t
first drops the boxes overlapped by any box kept in earlier tiles (one [N, tile] IoU block, in parallel),
then resolves suppression inside the tile by iterating k <- candidates & ~any_{i<j}(k_i & overlap_ij) to its
fixed point. That fixed point is unique (k_j depends only on k_i for i < j) and equals the sequential
greedy result; it is reached after at most tile_size + 1 iterations, in practice a handful. The tile loop
stops as soon as ``max_output`` boxes are kept, so the cost is O(N^2) IoU evaluations at worst with only
about N / tile_size sequential steps -- a plain one-box-per-iteration loop would need N dependent steps,
each a kernel launch on an accelerator. No full N x N IoU matrix is ever built, so N of 10^4 (RPN
proposals over all levels) is fine.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from bob_jax.ops.boxes import box_iou

__all__ = ["batched_nms", "nms"]


def nms(boxes, scores, iou_threshold, max_output: int, valid=None, *, tile_size: int = 256) -> jax.Array:
    """Class-agnostic NMS. boxes [N, 4], scores [N], optional ``valid`` [N] bool (False rows are padding:
    never kept, never suppress). Returns int32 [max_output]: kept indices, descending score, -1 padded."""
    return _greedy_nms(boxes, scores, None, iou_threshold, max_output, valid, tile_size)


def batched_nms(
    boxes, scores, classes, iou_threshold, max_output: int, valid=None, *, tile_size: int = 256
) -> jax.Array:
    """NMS run independently per class (``classes`` [N] int): boxes of different classes never suppress
    each other. Otherwise as :func:`nms`."""
    return _greedy_nms(boxes, scores, classes, iou_threshold, max_output, valid, tile_size)


def _greedy_nms(boxes, scores, classes, iou_threshold, max_output, valid, tile_size) -> jax.Array:
    boxes = jnp.asarray(boxes)
    scores = jnp.asarray(scores)
    n = boxes.shape[0]
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {boxes.shape}")
    if scores.shape != (n,):
        raise ValueError(f"scores must have shape [N] = [{n}] like boxes, got {scores.shape}")
    if classes is not None and jnp.shape(classes) != (n,):
        raise ValueError(f"classes must have shape [N] = [{n}] like boxes, got {jnp.shape(classes)}")
    if valid is not None and jnp.shape(valid) != (n,):
        raise ValueError(f"valid must be a bool mask of shape [N] = [{n}], got {jnp.shape(valid)}")
    if not isinstance(max_output, int) or max_output < 1:
        raise ValueError(f"max_output must be a positive Python int (a static size), got {max_output!r}")
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive Python int, got {tile_size!r}")
    if n == 0:
        return jnp.full((max_output,), -1, jnp.int32)
    candidate = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
    classes = None if classes is None else jnp.asarray(classes)
    return _sorted_greedy_nms(boxes, scores, classes, candidate, iou_threshold, max_output, min(tile_size, n))


@functools.partial(jax.jit, static_argnums=(5, 6))
def _sorted_greedy_nms(boxes, scores, classes, candidate, iou_threshold, max_output, tile):
    n = boxes.shape[0]
    order = jnp.argsort(-scores, stable=True)
    num_tiles = -(-n // tile)
    pad = num_tiles * tile - n
    sorted_boxes = jnp.pad(boxes[order], ((0, pad), (0, 0)))
    candidate = jnp.pad(candidate[order], (0, pad))
    sorted_classes = None if classes is None else jnp.pad(classes[order], (0, pad))
    keep = _suppress(sorted_boxes, sorted_classes, candidate, iou_threshold, max_output, tile)

    # Kept positions first, in sorted order (a stable argsort compiles faster than nonzero(size=...)).
    keep = jnp.pad(keep, (0, max(0, max_output - keep.shape[0])))
    positions = jnp.argsort(~keep, stable=True)[:max_output]
    return jnp.where(keep[positions], order[jnp.clip(positions, 0, n - 1)], -1).astype(jnp.int32)


def _suppress(boxes, classes, candidate, iou_threshold, max_output, tile) -> jax.Array:
    """Greedy keep mask over score-sorted boxes [Np, 4] (Np a multiple of ``tile``)."""
    num = boxes.shape[0]
    num_tiles = num // tile
    rows = jnp.arange(num)
    earlier_in_tile = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]

    def tile_step(state):
        t, keep, num_kept = state
        start = t * tile
        overlaps = box_iou(boxes, lax.dynamic_slice_in_dim(boxes, start, tile)) > iou_threshold  # [Np, tile]
        if classes is not None:
            overlaps &= classes[:, None] == lax.dynamic_slice_in_dim(classes, start, tile)[None, :]
        kept_before = keep & (rows < start)
        survivors = lax.dynamic_slice_in_dim(keep, start, tile)
        survivors &= ~jnp.any(overlaps & kept_before[:, None], axis=0)
        within = lax.dynamic_slice_in_dim(overlaps, start, tile, axis=0) & earlier_in_tile

        def refine(carry):
            current, _ = carry
            new = survivors & ~jnp.any(within & current[:, None], axis=0)
            return new, jnp.any(new != current)

        tile_keep, _ = lax.while_loop(lambda c: c[1], refine, (survivors, jnp.array(True)))
        keep = lax.dynamic_update_slice_in_dim(keep, tile_keep, start, axis=0)
        return t + 1, keep, num_kept + jnp.sum(tile_keep, dtype=jnp.int32)

    def more_to_do(state):
        t, _, num_kept = state
        return (t < num_tiles) & (num_kept < max_output)

    done, keep, _ = lax.while_loop(more_to_do, tile_step, (jnp.int32(0), candidate, jnp.int32(0)))
    # Tiles after an early stop still hold raw candidates: drop them.
    return keep & (rows < done * tile)
