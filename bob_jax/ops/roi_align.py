"""RoIAlign on NHWC feature maps with torchvision's exact sampling semantics, in fixed shapes.

Per RoI and output bin, torchvision's ``roi_align`` averages bilinear samples on a regular grid:

* box corners are scaled by ``spatial_scale``; ``aligned=True`` (detectron2's ROIAlignV2) then shifts them
  by -0.5 so that pixel centres sit at integer + 0.5; ``aligned=False`` instead forces the box size >= 1;
* bin size = box size / output size; the grid has ``sampling_ratio`` samples per bin side, or, for
  ``sampling_ratio=0``, the adaptive ceil(box size / output size) samples per side, and the bin value is
  the sum of the samples divided by count = max(grid_h * grid_w, 1);
* a sample with y < -1 or y > H (or x < -1 or x > W) contributes 0; y in [-1, 0] is clamped to 0; a sample
  at or past row H - 1 uses row H - 1 alone (same for x).

Fixed shapes: the adaptive grid is data-dependent, so every bin carries a static grid of
``max_sampling_ratio`` samples per side of which only the first grid_h (grid_w) are valid. This is exact
whenever the adaptive count fits; a side whose adaptive count exceeds the maximum uses exactly
``max_sampling_ratio`` evenly spaced samples on that side (what torchvision computes with that fixed
sampling ratio). At the default 8 that only affects boxes more than 8 x output_size feature pixels tall or
wide (e.g. > 56 pixels of p5 at 7x7: boxes over 1792 image pixels).

Implementation: separable interpolation matrices, not gathers. Bilinear weights and the zero rule factor
into a y part and an x part, and so does the average (1 / grid_h times 1 / grid_w), so each RoI's output is
Wy @ F @ Wx^T with Wy [out_h, H] and Wx [out_w, W] holding the bin-averaged interpolation weights. Why
this over gathering the 4 corners of every sample: (1) the cost does not depend on
``max_sampling_ratio`` -- the static grid only exists while the small weight matrices are built, so the
maximum can be generous at no cost, while a gather touches 4 * out^2 * max_sampling_ratio^2 feature vectors
per RoI (6.6 GB of gathered float32 for 512 RoIs, 7x7, max 8, C=256, unless the compiler fuses it);
(2) the work is dense matmuls, which map to the MXU / tensor cores, whereas gathers are slow on TPU;
(3) the backward pass w.r.t. the features is again two matmuls instead of a scatter-add. The price is
O(out * H * W * C) multiply-adds per RoI, i.e. it grows with the map size. Matmuls run at ``precision``
(HIGHEST by default, like torchvision's float32 arithmetic; pass ``lax.Precision.DEFAULT`` to trade
accuracy for speed on TF32/bf16 hardware).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from bob_jax.ops.boxes import box_area

__all__ = ["assign_fpn_levels", "multilevel_roi_align", "roi_align"]


def _pair(output_size) -> tuple[int, int]:
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
        raise ValueError(
            f"output_size must be a positive int or an (height, width) pair of them, got {output_size!r}"
        )
    return size


def _check_sampling(sampling_ratio, max_sampling_ratio) -> None:
    if not isinstance(sampling_ratio, int) or sampling_ratio < 0:
        raise ValueError(f"sampling_ratio must be an int >= 0 (0 = adaptive), got {sampling_ratio!r}")
    if not isinstance(max_sampling_ratio, int) or max_sampling_ratio < 1:
        raise ValueError(f"max_sampling_ratio must be an int >= 1, got {max_sampling_ratio!r}")


def _axis_weights(lo, hi, out, length, spatial_scale, sampling_ratio, aligned, max_sampling_ratio):
    """Bin-averaged interpolation weights [out, length] of one RoI along one axis (y with H, or x with W).

    ``lo``/``hi`` are the box's scalar edges on this axis in input coordinates. The arithmetic mirrors
    torchvision's kernel operation by operation so that float32 sample positions agree.
    """
    offset = 0.5 if aligned else 0.0
    start = lo * spatial_scale - offset
    size = hi * spatial_scale - offset - start
    if not aligned:
        size = jnp.maximum(size, 1.0)
    bin_size = size / out
    if sampling_ratio > 0:
        num_samples = sampling_ratio
        grid = jnp.float32(sampling_ratio)
    else:
        num_samples = max_sampling_ratio
        # Adaptive count, capped to the static grid; <= 0 for empty/inverted boxes (no valid sample).
        grid = jnp.minimum(jnp.ceil(size / out), max_sampling_ratio)
    divisor = jnp.maximum(grid, 1.0)
    bins = jnp.arange(out, dtype=jnp.float32)[:, None]
    samples = jnp.arange(num_samples, dtype=jnp.float32)[None, :]
    pos = start + bins * bin_size + (samples + 0.5) * bin_size / divisor  # [out, num_samples]

    contributes = (samples < grid) & (pos >= -1.0) & (pos <= length)
    # torchvision clamps [-1, 0] to 0 and [H - 1, H] to H - 1, then takes floor/ceil neighbours with
    # weights 1 - frac / frac; on the clamped position that is the tent max(0, 1 - |cell - pos|).
    pos = jnp.clip(pos, 0.0, length - 1.0)
    cells = jnp.arange(length, dtype=jnp.float32)
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(cells - pos[..., None]))
    weights = weights * (contributes / divisor)[..., None]
    return weights.sum(axis=1)


def _roi_weights(boxes, out_hw, map_hw, spatial_scale, sampling_ratio, aligned, max_sampling_ratio):
    """Row and column weights ([K, out_h, H], [K, out_w, W]) of boxes [K, 4], vmapped over the RoIs."""
    (out_h, out_w), (height, width) = out_hw, map_hw
    boxes = boxes.astype(jnp.float32)
    weights = functools.partial(
        _axis_weights,
        spatial_scale=spatial_scale,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        max_sampling_ratio=max_sampling_ratio,
    )

    def row_fn(box):
        return weights(box[1], box[3], out_h, height)

    def col_fn(box):
        return weights(box[0], box[2], out_w, width)

    return jax.vmap(row_fn)(boxes), jax.vmap(col_fn)(boxes)


def roi_align(
    features: jax.Array,
    boxes: jax.Array,
    box_batch_index: jax.Array,
    output_size,
    spatial_scale: float,
    sampling_ratio: int = 0,
    aligned: bool = True,
    max_sampling_ratio: int = 8,
    *,
    precision=lax.Precision.HIGHEST,
) -> jax.Array:
    """RoIAlign (torchvision semantics, see the module docstring) -> [K, out_h, out_w, C].

    features [N, H, W, C] (NHWC); boxes [K, 4] (x1, y1, x2, y2) in input coordinates, mapped to the
    map by ``spatial_scale`` (1 / stride); box_batch_index [K] int, the image of each box (an index
    outside 0..N-1 yields zeros); output_size int or (out_h, out_w). ``spatial_scale``, the sampling
    settings and ``aligned`` are static Python values (one compilation per setting).

    The image selection is folded into the row contraction (a one-hot over N), which costs a factor N
    in that matmul (K * out_h * N * H * W * C multiply-adds) but avoids materialising a [K, H, W, C]
    per-RoI copy of the maps. Boxes grouped per image: use :func:`multilevel_roi_align`, which vmaps over
    images. Many maps with few channels (mask targets cropped from G ground-truth bitmaps): vmap this
    function over the RoIs with each RoI's own map as a batch of one, which drops the factor N.
    """
    out_hw = _pair(output_size)
    _check_sampling(sampling_ratio, max_sampling_ratio)
    if features.ndim != 4:
        raise ValueError(f"features must be NHWC [N, H, W, C], got shape {features.shape}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [K, 4] as (x1, y1, x2, y2), got {boxes.shape}")
    if jnp.shape(box_batch_index) != boxes.shape[:1]:
        raise ValueError(
            f"box_batch_index must have shape [K] = [{boxes.shape[0]}] (one image index per box), "
            f"got {jnp.shape(box_batch_index)}"
        )
    return _roi_align(
        features,
        boxes,
        box_batch_index,
        out_hw,
        float(spatial_scale),
        sampling_ratio,
        bool(aligned),
        max_sampling_ratio,
        precision,
    )


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7, 8))
def _roi_align(
    features,
    boxes,
    box_batch_index,
    out_hw,
    spatial_scale,
    sampling_ratio,
    aligned,
    max_sampling_ratio,
    precision,
):
    num_images, height, width, _ = features.shape
    rows, cols = _roi_weights(
        boxes, out_hw, (height, width), spatial_scale, sampling_ratio, aligned, max_sampling_ratio
    )
    image = jax.nn.one_hot(box_batch_index, num_images, dtype=rows.dtype)
    rows = rows[:, :, None, :] * image[:, None, :, None]  # [K, out_h, N, H]
    pooled_rows = jnp.einsum("kpnh,nhwc->kpwc", rows, features, precision=precision)
    out = jnp.einsum("kpwc,kqw->kpqc", pooled_rows, cols, precision=precision)
    return out.astype(features.dtype)


def assign_fpn_levels(
    boxes, min_level: int, max_level: int, canonical_box_size: float = 224, canonical_level: int = 4
) -> jax.Array:
    """detectron2's ``assign_boxes_to_levels``: floor(canonical_level + log2(sqrt(area) / canonical_box_size
    + 1e-8)) clamped to [min_level, max_level]. boxes [..., 4] -> int32 [...] pyramid levels (not offsets).
    Empty or inverted boxes (area <= 0, e.g. padding) go to ``min_level``."""
    area = box_area(jnp.asarray(boxes, jnp.float32))
    size = jnp.sqrt(jnp.maximum(area, 0.0))
    level = jnp.floor(canonical_level + jnp.log2(size / canonical_box_size + 1e-8))
    return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def _level_numbers(levels: Sequence[str]) -> list[int]:
    numbers = []
    for name in levels:
        match = re.fullmatch(r"p(\d+)", name)
        if match is None:
            raise ValueError(f"level names must look like 'p<k>' (stride 2**k), got {name!r} in {levels!r}")
        numbers.append(int(match.group(1)))
    if not numbers or numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        raise ValueError(
            f"levels must be consecutive and increasing, e.g. ('p2', 'p3', 'p4', 'p5'); got {levels!r}"
        )
    return numbers


def multilevel_roi_align(
    features: Mapping[str, jax.Array],
    boxes: jax.Array,
    output_size,
    *,
    levels: Sequence[str] = ("p2", "p3", "p4", "p5"),
    canonical_box_size: float = 224,
    canonical_level: int = 4,
    sampling_ratio: int = 0,
    aligned: bool = True,
    max_sampling_ratio: int = 8,
    precision=lax.Precision.HIGHEST,
) -> jax.Array:
    """Pool each box from its FPN level (detectron2 ``ROIPooler``): features {"p<k>": [B, H_k, W_k, C]}
    with stride 2**k, boxes [B, R, 4] in input coordinates -> [B, R, out_h, out_w, C].

    Level of a box: :func:`assign_fpn_levels` clamped to the given levels. Fixed shapes: every level pools
    every box with the weights of boxes from other levels zeroed, and the levels are summed (exact: they
    add zeros), so the cost is that of pooling all boxes on every level.
    """
    out_hw = _pair(output_size)
    _check_sampling(sampling_ratio, max_sampling_ratio)
    numbers = _level_numbers(levels)
    missing = [name for name in levels if name not in features]
    if missing:
        raise ValueError(f"features lack levels {missing}; available: {sorted(features)}")
    if boxes.ndim != 3 or boxes.shape[2] != 4:
        raise ValueError(f"boxes must have shape [B, R, 4] as (x1, y1, x2, y2), got {boxes.shape}")
    maps = [features[name] for name in levels]
    for name, fmap in zip(levels, maps):
        if fmap.ndim != 4 or fmap.shape[0] != boxes.shape[0] or fmap.shape[3] != maps[0].shape[3]:
            expected = f"[B={boxes.shape[0]}, H, W, C={maps[0].shape[3]}]"
            raise ValueError(f"features[{name!r}] must be NHWC {expected}, got {fmap.shape}")
    return _multilevel_roi_align(
        tuple(maps),
        boxes,
        out_hw,
        tuple(numbers),
        float(canonical_box_size),
        canonical_level,
        sampling_ratio,
        bool(aligned),
        max_sampling_ratio,
        precision,
    )


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7, 8, 9))
def _multilevel_roi_align(
    maps,
    boxes,
    out_hw,
    numbers,
    canonical_box_size,
    canonical_level,
    sampling_ratio,
    aligned,
    max_sampling_ratio,
    precision,
):
    assigned = assign_fpn_levels(boxes, numbers[0], numbers[-1], canonical_box_size, canonical_level)
    total = 0.0
    for number, fmap in zip(numbers, maps):
        spatial_scale = 1.0 / 2**number

        def pool_image(image_map, image_boxes, on_level, spatial_scale=spatial_scale):
            rows, cols = _roi_weights(
                image_boxes,
                out_hw,
                image_map.shape[:2],
                spatial_scale,
                sampling_ratio,
                aligned,
                max_sampling_ratio,
            )
            rows = rows * on_level[:, None, None]
            pooled_rows = jnp.einsum("rph,hwc->rpwc", rows, image_map, precision=precision)
            return jnp.einsum("rpwc,rqw->rpqc", pooled_rows, cols, precision=precision)

        total = total + jax.vmap(pool_image)(fmap, boxes, (assigned == number).astype(jnp.float32))
    return total.astype(maps[0].dtype)
