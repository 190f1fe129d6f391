"""Tests for bob_jax.ops: RoIAlign and NMS against torchvision (reference) and plain-numpy loop
implementations, box utilities, FPN level assignment on hand-computed boxes, jit/vmap, gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bob_jax import ops

# ----------------------------------------------------------------------------------------------------------
# Independent references: sample-by-sample loops written from torchvision's kernel description.


def _bilinear(image, y, x):
    height, width = image.shape[:2]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(image.shape[2], np.float32)
    y, x = max(y, np.float32(0)), max(x, np.float32(0))
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = np.float32(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = np.float32(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return (
        hy * hx * image[y_low, x_low]
        + hy * lx * image[y_low, x_high]
        + ly * hx * image[y_high, x_low]
        + ly * lx * image[y_high, x_high]
    )


def _roi_align_loop(features, boxes, batch_index, out_hw, scale, sampling_ratio, aligned, max_sampling_ratio):
    """One bilinear sample at a time (float32); adaptive counts capped per side at ``max_sampling_ratio``."""
    out_h, out_w = out_hw
    f32 = np.float32
    offset = f32(0.5) if aligned else f32(0)
    out = np.zeros((len(boxes), out_h, out_w, features.shape[-1]), np.float32)
    for k, (box, b) in enumerate(zip(boxes.astype(np.float32), batch_index)):
        x1, y1 = box[0] * f32(scale) - offset, box[1] * f32(scale) - offset
        roi_w, roi_h = box[2] * f32(scale) - offset - x1, box[3] * f32(scale) - offset - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, f32(1)), max(roi_h, f32(1))
        bin_h, bin_w = roi_h / f32(out_h), roi_w / f32(out_w)
        grid_h = sampling_ratio or min(math.ceil(roi_h / f32(out_h)), max_sampling_ratio)
        grid_w = sampling_ratio or min(math.ceil(roi_w / f32(out_w)), max_sampling_ratio)
        count = max(grid_h * grid_w, 1)
        for ph in range(out_h):
            for pw in range(out_w):
                acc = np.zeros(features.shape[-1], np.float32)
                for iy in range(grid_h):
                    y = y1 + f32(ph) * bin_h + f32(iy + 0.5) * bin_h / f32(grid_h)
                    for ix in range(grid_w):
                        x = x1 + f32(pw) * bin_w + f32(ix + 0.5) * bin_w / f32(grid_w)
                        acc += _bilinear(features[b], y, x)
                out[k, ph, pw] = acc / count
    return out


def _iou_np(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def _greedy_nms_np(boxes, scores, classes, threshold):
    """Textbook greedy NMS in float64: visit by descending score, drop same-class overlaps > threshold."""
    iou = _iou_np(boxes.astype(np.float64), boxes.astype(np.float64))
    kept = []
    for i in np.argsort(-scores, kind="stable"):
        if all(classes[i] != classes[j] or iou[i, j] <= threshold for j in kept):
            kept.append(i)
    return np.array(kept, np.int64)


# ----------------------------------------------------------------------------------------------------------
# Inputs


def _features(seed, n=2, h=20, w=24, c=3):
    return np.random.default_rng(seed).normal(size=(n, h, w, c)).astype(np.float32)


def _mixed_boxes(seed, map_hw=(20, 24), stride=4.0):
    """Boxes inside, partly outside, entirely outside, tiny (< 1 feature pixel) and inverted, in input
    pixels for a map of ``map_hw`` at ``stride``; all adaptive counts <= 8 at output 7x7 / 7x5."""
    rng = np.random.default_rng(seed)
    h, w = map_hw[0] * stride, map_hw[1] * stride
    inside = rng.uniform(0, 0.5, (12, 2)) * [w, h]
    inside = np.concatenate([inside, inside + rng.uniform(4, 0.5 * min(h, w), (12, 2))], 1)
    partly = rng.uniform(-0.3, 1.0, (12, 2)) * [w, h]
    partly = np.concatenate([partly, partly + rng.uniform(10, 0.6 * min(h, w), (12, 2))], 1)
    outside = np.array([[-60, -50, -20, -10], [w + 5, 10, w + 60, 50], [10, h + 30, 70, h + 90]], float)
    tiny = rng.uniform(0, 0.9, (6, 2)) * [w, h]
    tiny = np.concatenate([tiny, tiny + rng.uniform(0.0, 3.0, (6, 2))], 1)
    inverted = np.array([[40, 40, 30, 45], [20, 30, 28, 10]], float)
    return np.concatenate([inside, partly, outside, tiny, inverted]).astype(np.float32)


def _torch_roi_align(
    torch, torchvision, features, boxes, batch_index, out_hw, scale, sampling_ratio, aligned, grad=False
):
    feats = torch.from_numpy(np.ascontiguousarray(features.transpose(0, 3, 1, 2))).requires_grad_(grad)
    rois = torch.from_numpy(np.concatenate([batch_index[:, None], boxes], 1).astype(np.float32))
    out = torchvision.ops.roi_align(feats, rois, out_hw, scale, sampling_ratio, aligned)
    return feats, out


def _torchvision(reference):
    torch, _ = reference
    import torchvision

    return torch, torchvision


# ----------------------------------------------------------------------------------------------------------
# RoIAlign


@pytest.mark.reference
@pytest.mark.parametrize(
    "aligned, sampling_ratio, out_hw", [(True, 0, 7), (True, 2, (7, 5)), (False, 0, (7, 5)), (False, 2, 7)]
)
def test_roi_align_matches_torchvision(reference, aligned, sampling_ratio, out_hw):
    torch, torchvision = _torchvision(reference)
    features, boxes = _features(0), _mixed_boxes(1)
    batch_index = np.random.default_rng(2).integers(0, 2, len(boxes))
    pair = (out_hw, out_hw) if isinstance(out_hw, int) else out_hw
    _, expected = _torch_roi_align(
        torch, torchvision, features, boxes, batch_index, pair, 0.25, sampling_ratio, aligned
    )
    expected = expected.numpy().transpose(0, 2, 3, 1)
    got = ops.roi_align(
        jnp.asarray(features),
        jnp.asarray(boxes),
        jnp.asarray(batch_index),
        out_hw,
        0.25,
        sampling_ratio,
        aligned,
    )
    assert got.shape == (len(boxes), *pair, 3)
    assert np.std(expected) > 0.1  # not a comparison of zeros
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=2e-5)


def _boundary_boxes(height, width):
    """aligned=False, scale 1, output 1x1, sampling ratio 1: the single sample sits at the box centre, so
    centres at exactly -1, -0.5, H - 1, H - 0.5, H and just past H hit each boundary rule."""
    centres_y = [-1.0, -1.0 - 2**-10, -0.5, 0.0, height - 1.0, height - 0.5, float(height), height + 2**-10]
    x = width / 2 - 0.25
    boxes = [[x - 1, cy - 1, x + 1, cy + 1] for cy in centres_y]
    boxes += [
        [cy - 1, 3.0, cy + 1, 5.0] for cy in [-1.0, -1.0 - 2**-10, width - 0.5, float(width), width + 2**-10]
    ]
    return np.array(boxes, np.float32)


def test_roi_align_boundary_rules_match_loop_reference():
    features = _features(3, n=1, h=6, w=7, c=2)
    boxes = _boundary_boxes(6, 7)
    zeros = np.zeros(len(boxes), np.int32)
    got = np.asarray(
        ops.roi_align(jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(zeros), 1, 1.0, 1, False)
    )
    expected = _roi_align_loop(features, boxes, zeros, (1, 1), 1.0, 1, False, 8)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # The rules bite: y = -1 is clamped to row 0, y = H uses row H - 1 alone, just past H gives 0.
    x_low, x_frac = int(7 / 2 - 0.25), 7 / 2 - 0.25 - int(7 / 2 - 0.25)
    row = lambda r: (1 - x_frac) * features[0, r, x_low] + x_frac * features[0, r, x_low + 1]
    np.testing.assert_allclose(got[0, 0, 0], row(0), atol=1e-6)
    np.testing.assert_allclose(got[1, 0, 0], 0.0, atol=0)
    np.testing.assert_allclose(got[6, 0, 0], row(5), atol=1e-6)
    np.testing.assert_allclose(got[7, 0, 0], 0.0, atol=0)


@pytest.mark.reference
def test_roi_align_boundary_rules_match_torchvision(reference):
    torch, torchvision = _torchvision(reference)
    features, boxes = _features(3, n=1, h=6, w=7, c=2), _boundary_boxes(6, 7)
    zeros = np.zeros(len(boxes), np.int64)
    _, expected = _torch_roi_align(torch, torchvision, features, boxes, zeros, (1, 1), 1.0, 1, False)
    got = ops.roi_align(jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(zeros), 1, 1.0, 1, False)
    np.testing.assert_allclose(np.asarray(got), expected.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-6)


def test_roi_align_matches_loop_reference_with_capped_counts():
    """Adaptive counts above max_sampling_ratio are capped per side (tall-narrow, wide-flat, huge boxes)."""
    features = _features(4, n=2, h=30, w=26, c=4)
    boxes = np.array(
        [[10, -20, 18, 110], [-10, 40, 100, 47], [-20, -30, 120, 130], [20, 20, 50, 60], [3, 4, 3.5, 4.2]],
        np.float32,
    )
    batch_index = np.array([0, 1, 1, 0, 1])
    for aligned in (True, False):
        got = ops.roi_align(
            jnp.asarray(features),
            jnp.asarray(boxes),
            jnp.asarray(batch_index),
            (4, 3),
            1.0,
            0,
            aligned,
            max_sampling_ratio=5,
        )
        expected = _roi_align_loop(features, boxes, batch_index, (4, 3), 1.0, 0, aligned, 5)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=2e-5)


@pytest.mark.reference
def test_roi_align_huge_boxes_against_torchvision(reference):
    """Adaptive count > max_sampling_ratio on both sides: equals torchvision with sampling_ratio = max
    (the documented deviation from adaptive), and equals adaptive torchvision once the maximum fits."""
    torch, torchvision = _torchvision(reference)
    features = _features(5, n=1, h=40, w=40, c=3)
    boxes = np.array(
        [[-8, -4, 150, 160], [4, 6, 150, 130], [-30, 0, 170, 150]], np.float32
    )  # ceil(size/7) >= 5
    zeros = np.zeros(len(boxes), np.int64)
    args = (jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(zeros), 7, 0.25, 0, True)

    def torch_out(sampling_ratio):
        _, out = _torch_roi_align(
            torch, torchvision, features, boxes, zeros, (7, 7), 0.25, sampling_ratio, True
        )
        return out.numpy().transpose(0, 2, 3, 1)

    capped = np.asarray(ops.roi_align(*args, max_sampling_ratio=3))
    np.testing.assert_allclose(capped, torch_out(3), rtol=0, atol=2e-5)
    assert np.abs(capped - torch_out(0)).max() > 1e-3  # the cap really changes the result
    np.testing.assert_allclose(
        np.asarray(ops.roi_align(*args, max_sampling_ratio=8)), torch_out(0), rtol=0, atol=2e-5
    )


@pytest.mark.reference
def test_roi_align_feature_gradients_match_torchvision(reference):
    torch, torchvision = _torchvision(reference)
    features, boxes = _features(6), _mixed_boxes(7)
    batch_index = np.random.default_rng(8).integers(0, 2, len(boxes))
    cotangent = np.random.default_rng(9).normal(size=(len(boxes), 7, 7, 3)).astype(np.float32)
    feats, out = _torch_roi_align(
        torch, torchvision, features, boxes, batch_index, (7, 7), 0.25, 0, True, grad=True
    )
    (out * torch.from_numpy(cotangent.transpose(0, 3, 1, 2))).sum().backward()
    expected = feats.grad.numpy().transpose(0, 2, 3, 1)

    def loss(f):
        return jnp.sum(ops.roi_align(f, jnp.asarray(boxes), jnp.asarray(batch_index), 7, 0.25) * cotangent)

    got = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(features)))
    assert np.all(np.isfinite(got)) and np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-5)


def test_roi_align_gradients_are_finite_and_local():
    features = _features(10, n=2, h=16, w=16, c=2)
    boxes = jnp.array([[8.0, 8.0, 24.0, 30.0], [-5.0, -5.0, 1.0, 1.0], [30, 30, 30, 30]])
    grads = jax.grad(lambda f: ops.roi_align(f, boxes, jnp.array([1, 1, 0]), 7, 0.5).sum())(
        jnp.asarray(features)
    )
    grads = np.asarray(grads)
    assert np.all(np.isfinite(grads))
    assert np.all(grads[0] == 0)  # image 0 holds only the empty box
    assert grads[1, 4:15, 4:12].sum() > 0 and np.all(grads[1, 10:, 13:] == 0)


def test_roi_align_jit_vmap_and_batch_index():
    features, boxes = jnp.asarray(_features(11)), jnp.asarray(_mixed_boxes(12))
    batch_index = np.random.default_rng(13).integers(0, 2, len(boxes))
    pooled = ops.roi_align(features, boxes, jnp.asarray(batch_index), 7, 0.25)
    # Each box reads only its own image: pooling from image b alone gives the same rows for its boxes.
    for b in (0, 1):
        alone = ops.roi_align(features[b : b + 1], boxes, jnp.zeros(len(boxes), jnp.int32), 7, 0.25)
        np.testing.assert_allclose(
            np.asarray(pooled)[batch_index == b], np.asarray(alone)[batch_index == b], rtol=0, atol=1e-5
        )
    # Inside an outer jit, and under vmap over stacked box sets.
    stacked = jnp.stack([boxes, boxes[::-1]])
    mapped = jax.jit(jax.vmap(lambda bx: ops.roi_align(features, bx, jnp.asarray(batch_index), 7, 0.25)))(
        stacked
    )
    np.testing.assert_allclose(np.asarray(mapped[0]), np.asarray(pooled), rtol=0, atol=1e-5)


def test_roi_align_vmapped_per_roi_map_equals_batch_index():
    """The mask-target pattern: each RoI pooled from its own single-channel bitmap (N = 1 under vmap)."""
    rng = np.random.default_rng(16)
    masks = jnp.asarray((rng.uniform(size=(5, 32, 32, 1)) > 0.5).astype(np.float32))
    xy = rng.uniform(-4, 24, (9, 2))
    boxes = jnp.asarray(np.concatenate([xy, xy + rng.uniform(2, 20, (9, 2))], 1).astype(np.float32))
    owner = jnp.asarray(rng.integers(0, 5, 9))
    by_index = ops.roi_align(masks, boxes, owner, 6, 1.0)
    per_roi = jax.vmap(lambda m, b: ops.roi_align(m[None], b[None], jnp.zeros(1, jnp.int32), 6, 1.0)[0])(
        masks[owner], boxes
    )
    np.testing.assert_allclose(np.asarray(per_roi), np.asarray(by_index), rtol=0, atol=1e-6)


def test_roi_align_rejects_bad_input():
    features, boxes, index = jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 4)), jnp.zeros(3, jnp.int32)
    with pytest.raises(ValueError, match="NHWC"):
        ops.roi_align(features[0], boxes, index, 7, 1.0)
    with pytest.raises(ValueError, match=r"\[K, 4\]"):
        ops.roi_align(features, boxes[:, :3], index, 7, 1.0)
    with pytest.raises(ValueError, match="box_batch_index"):
        ops.roi_align(features, boxes, index[:2], 7, 1.0)
    with pytest.raises(ValueError, match="output_size"):
        ops.roi_align(features, boxes, index, 0, 1.0)
    with pytest.raises(ValueError, match="max_sampling_ratio"):
        ops.roi_align(features, boxes, index, 7, 1.0, max_sampling_ratio=0)


# ----------------------------------------------------------------------------------------------------------
# Multi-level RoIAlign


def test_fpn_level_assignment_hand_computed():
    # sqrt(area) -> floor(4 + log2(s / 224 + 1e-8)) clamped to [2, 5]:
    # 20 -> 0.51 -> 2 (clamped); 112 -> 3; 223 -> 3.99 -> 3; 224 -> 4; 300x100 (173.2) -> 3; 448 -> 5;
    # 2000 -> 7.16 -> 5 (clamped); 56 -> 2; padding (0 area) -> 2.
    boxes = np.array(
        [
            [0, 0, 20, 20],
            [10, 10, 122, 122],
            [0, 0, 223, 223],
            [5, 5, 229, 229],
            [0, 0, 300, 100],
            [0, 0, 448, 448],
            [0, 0, 2000, 2000],
            [0, 0, 56, 56],
            [0, 0, 0, 0],
        ],
        np.float32,
    )
    levels = np.asarray(ops.assign_fpn_levels(jnp.asarray(boxes), 2, 5))
    np.testing.assert_array_equal(levels, [2, 3, 3, 4, 3, 5, 5, 2, 2])


def test_multilevel_roi_align_pools_each_box_from_its_level():
    rng = np.random.default_rng(14)
    size = 256
    features = {
        f"p{k}": jnp.asarray(rng.normal(size=(2, size >> k, size >> k, 4)).astype(np.float32))
        for k in range(2, 7)
    }
    boxes = np.array(
        [
            [[10, 10, 40, 50], [0, 0, 120, 110], [30, 20, 250, 240], [5, 5, 250, 255]],
            [[100, 100, 300, 300], [60, 60, 61, 61], [0, 0, 0, 0], [-20, 10, 40, 120]],
        ],
        np.float32,
    )
    levels = np.asarray(ops.assign_fpn_levels(jnp.asarray(boxes), 2, 5))
    assert set(levels.ravel()) == {2, 3, 4}  # several levels are exercised
    got = np.asarray(ops.multilevel_roi_align(features, jnp.asarray(boxes), 7))
    assert got.shape == (2, 4, 7, 7, 4)
    for b in range(2):
        for r in range(4):
            k = levels[b, r]
            expected = _roi_align_loop(
                np.asarray(features[f"p{k}"]), boxes[b, r : r + 1], [b], (7, 7), 1 / 2**k, 0, True, 8
            )
            np.testing.assert_allclose(got[b, r], expected[0], rtol=0, atol=1e-5)
    # levels and canonical size are honoured: on p4..p5 with canonical 112 (level 4 = 112 px) box 0 of
    # image 0 (sqrt area 34.6) is clamped to p4, box 2 (220: 4 + log2(1.96)) stays on p4, box 3 (247.5) is p5.
    shifted = np.asarray(
        ops.multilevel_roi_align(features, jnp.asarray(boxes), 7, levels=("p4", "p5"), canonical_box_size=112)
    )
    for r, k in [(0, 4), (2, 4), (3, 5)]:
        expected = _roi_align_loop(
            np.asarray(features[f"p{k}"]), boxes[0, r : r + 1], [0], (7, 7), 1 / 2**k, 0, True, 8
        )
        np.testing.assert_allclose(shifted[0, r], expected[0], rtol=0, atol=1e-5)


def test_multilevel_roi_align_rejects_bad_levels():
    features = {"p2": jnp.zeros((1, 8, 8, 2)), "p3": jnp.zeros((1, 4, 4, 2))}
    boxes = jnp.zeros((1, 2, 4))
    with pytest.raises(ValueError, match="lack levels"):
        ops.multilevel_roi_align(features, boxes, 7)
    with pytest.raises(ValueError, match="consecutive"):
        ops.multilevel_roi_align(features, boxes, 7, levels=("p3", "p2"))
    with pytest.raises(ValueError, match="p<k>"):
        ops.multilevel_roi_align(features, boxes, 7, levels=("res2",))
    with pytest.raises(ValueError, match=r"\[B, R, 4\]"):
        ops.multilevel_roi_align(features, boxes[0], 7, levels=("p2", "p3"))


# ----------------------------------------------------------------------------------------------------------
# NMS


def _nms_case(seed, n, num_classes, threshold):
    """Clustered boxes (many overlaps) with distinct scores. Boxes in a same-class pair whose IoU is within
    1e-4 of the threshold are marked invalid (returned mask), so the greedy result is unambiguous while the
    array size stays fixed (one compilation for every seed)."""
    rng = np.random.default_rng(seed)
    num_clusters = n // 5
    centres = rng.uniform(0, 400, (num_clusters, 2))
    sizes = rng.uniform(20, 80, (num_clusters, 2))
    cluster = rng.integers(0, num_clusters, n)
    wh = sizes[cluster] * rng.uniform(0.85, 1.15, (n, 2))
    xy = centres[cluster] + rng.normal(0, 0.08, (n, 2)) * wh
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1).astype(np.float32)
    classes = rng.integers(0, num_classes, n)
    iou = _iou_np(boxes.astype(np.float64), boxes.astype(np.float64))
    close = (np.abs(iou - threshold) < 1e-4) & (classes[:, None] == classes[None, :])
    valid = ~np.any(np.triu(close, 1), axis=0)
    scores = (rng.permutation(n) + 1.0).astype(np.float32) / n
    return boxes, scores, classes, valid


@pytest.mark.reference
@pytest.mark.parametrize("seed, threshold", [(0, 0.5), (1, 0.7), (2, 0.3)])
def test_batched_nms_matches_torchvision(reference, seed, threshold):
    torch, torchvision = _torchvision(reference)
    boxes, scores, classes, valid = _nms_case(seed, 600, 4, threshold)
    subset = np.nonzero(valid)[0]
    as_torch = lambda x: torch.from_numpy(x[subset])
    expected = subset[
        torchvision.ops.batched_nms(as_torch(boxes), as_torch(scores), as_torch(classes), threshold).numpy()
    ]
    assert 50 < len(expected) < len(subset) - 50  # plenty kept and plenty suppressed
    got = np.asarray(ops.batched_nms(boxes, scores, classes, threshold, 600, valid=valid, tile_size=64))
    np.testing.assert_array_equal(got[: len(expected)], expected)
    assert np.all(got[len(expected) :] == -1)
    # Truncated output (the tile loop stops early) inside an outer jit.
    truncated = jax.jit(lambda *a: ops.batched_nms(*a, 40, valid=valid))(boxes, scores, classes, threshold)
    np.testing.assert_array_equal(np.asarray(truncated), expected[:40])
    single = subset[torchvision.ops.nms(as_torch(boxes), as_torch(scores), threshold).numpy()]
    got_single = np.asarray(ops.nms(boxes, scores, threshold, 600, valid=valid))
    np.testing.assert_array_equal(got_single[: len(single)], single)


@pytest.mark.parametrize("tile_size", [1, 7])
def test_batched_nms_matches_numpy_greedy_for_any_tile_size(tile_size):
    boxes, scores, classes, valid = _nms_case(3, 300, 3, 0.5)
    subset = np.nonzero(valid)[0]
    expected = subset[_greedy_nms_np(boxes[subset], scores[subset], classes[subset], 0.5)]
    assert 30 < len(expected) < len(subset) - 30
    got = np.asarray(ops.batched_nms(boxes, scores, classes, 0.5, 320, valid=valid, tile_size=tile_size))
    np.testing.assert_array_equal(got[: len(expected)], expected)
    assert np.all(got[len(expected) :] == -1)


def test_nms_valid_mask_ignores_padding():
    boxes, scores, classes, _ = _nms_case(4, 300, 3, 0.5)
    valid = np.random.default_rng(5).uniform(size=len(boxes)) < 0.7
    scores = np.where(valid, scores, scores + 10.0).astype(np.float32)  # padding outranks every real box
    got = np.asarray(ops.batched_nms(boxes, scores, classes, 0.5, 320, valid=jnp.asarray(valid), tile_size=7))
    subset = np.nonzero(valid)[0]
    expected = subset[_greedy_nms_np(boxes[subset], scores[subset], classes[subset], 0.5)]
    np.testing.assert_array_equal(got[: len(expected)], expected)
    assert np.all(got[len(expected) :] == -1)
    nothing = ops.nms(boxes, scores, 0.6, 5, valid=jnp.zeros(len(boxes), bool))
    np.testing.assert_array_equal(np.asarray(nothing), [-1] * 5)
    np.testing.assert_array_equal(np.asarray(ops.nms(np.zeros((0, 4)), np.zeros(0), 0.5, 3)), [-1] * 3)


def test_batched_nms_hand_case_and_vmap():
    boxes = np.array(
        [[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [20, 20, 30, 30], [21, 21, 31, 31]], np.float32
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.95], np.float32)
    classes = np.array([0, 0, 1, 0, 0])
    # IoU(0, 1) = 90 / 110 = 0.82 > 0.5: box 1 goes; box 2 is another class; IoU(4, 3) = 81 / 119 = 0.68.
    got = ops.batched_nms(boxes, scores, classes, 0.5, 5)
    np.testing.assert_array_equal(np.asarray(got), [4, 0, 2, -1, -1])
    # At threshold 0.7 box 3 survives (0.68 <= 0.7); class-agnostic nms also drops box 2 (IoU 1 with box 0).
    np.testing.assert_array_equal(
        np.asarray(ops.batched_nms(boxes, scores, classes, 0.7, 5)), [4, 0, 2, 3, -1]
    )
    np.testing.assert_array_equal(np.asarray(ops.nms(boxes, scores, 0.7, 5)), [4, 0, 3, -1, -1])
    # vmap over images (padded to the same size) equals a loop.
    batch = jnp.stack([jnp.asarray(boxes), jnp.asarray(boxes[::-1])])
    batch_scores = jnp.stack([jnp.asarray(scores), jnp.asarray(scores[::-1])])
    mapped = jax.jit(jax.vmap(lambda b, s: ops.nms(b, s, 0.7, 5)))(batch, batch_scores)
    np.testing.assert_array_equal(
        np.asarray(mapped[1]), np.asarray(ops.nms(boxes[::-1], scores[::-1], 0.7, 5))
    )


def test_nms_rejects_bad_input():
    with pytest.raises(ValueError, match="max_output"):
        ops.nms(np.zeros((3, 4)), np.zeros(3), 0.5, 0)
    with pytest.raises(ValueError, match="scores"):
        ops.nms(np.zeros((3, 4)), np.zeros(2), 0.5, 2)
    with pytest.raises(ValueError, match="classes"):
        ops.batched_nms(np.zeros((3, 4)), np.zeros(3), np.zeros(4), 0.5, 2)
    with pytest.raises(ValueError, match="valid"):
        ops.nms(np.zeros((3, 4)), np.zeros(3), 0.5, 2, valid=np.ones(2, bool))


# ----------------------------------------------------------------------------------------------------------
# Box utilities


@pytest.mark.reference
def test_box_iou_and_giou_match_torchvision(reference):
    torch, torchvision = _torchvision(reference)
    rng = np.random.default_rng(15)
    a = rng.uniform(0, 50, (30, 2))
    a = np.concatenate([a, a + rng.uniform(1, 40, (30, 2))], 1).astype(np.float32)
    b = np.concatenate([a[:5] + 3, a[5:20] * 1.1]).astype(np.float32)
    for ours, theirs in [
        (ops.box_iou, torchvision.ops.box_iou),
        (ops.generalized_box_iou, torchvision.ops.generalized_box_iou),
    ]:
        expected = theirs(torch.from_numpy(a), torch.from_numpy(b)).numpy()
        np.testing.assert_allclose(
            np.asarray(ours(jnp.asarray(a), jnp.asarray(b))), expected, rtol=1e-6, atol=1e-6
        )
    np.testing.assert_allclose(
        np.asarray(ops.box_area(jnp.asarray(a))),
        torchvision.ops.box_area(torch.from_numpy(a)).numpy(),
        rtol=1e-6,
    )


def test_box_utilities_hand_cases():
    a = jnp.array([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 4.0]])
    b = jnp.array([[1.0, 1.0, 3.0, 3.0], [4.0, 4.0, 5.0, 5.0]])
    np.testing.assert_allclose(np.asarray(ops.box_area(a)), [4.0, 6.0])
    np.testing.assert_allclose(np.asarray(ops.box_iou(a, b)), [[1 / 7, 0.0], [4 / 6, 0.0]], rtol=1e-6)
    # GIoU: enclosing boxes 3x3 (area 9, union 7) -> 1/7 - 2/9; 5x5 (union 5) -> 0 - 20/25.
    giou = np.asarray(ops.generalized_box_iou(a, b))
    np.testing.assert_allclose(giou[0], [1 / 7 - 2 / 9, -20 / 25], rtol=1e-6)
    # Batched leading dims broadcast like torchvision's [..., N, 4].
    assert ops.box_iou(jnp.stack([a, a]), jnp.stack([b, b])).shape == (2, 2, 2)
    boxes = jnp.array([[[-5.0, 3.0, 40.0, 70.0]], [[-5.0, 3.0, 40.0, 70.0]]])
    sizes = jnp.array([[50, 30], [20, 60]])  # (height, width) per image
    clipped = ops.clip_boxes(boxes, sizes[:, None, :])
    np.testing.assert_allclose(np.asarray(clipped), [[[0, 3, 30, 50]], [[0, 3, 40, 20]]])
    np.testing.assert_allclose(np.asarray(ops.clip_boxes(boxes[0], (10, 10))), [[0, 3, 10, 10]])
    with pytest.raises(ValueError, match="image_size"):
        ops.clip_boxes(boxes, (1, 2, 3))
