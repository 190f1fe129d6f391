"""RPN pieces: box coder, anchors, matcher, label sampling, RPN head, losses and proposals.

Expected numbers are written by hand from detectron2's conventions (Box2BoxTransform,
DefaultAnchorGenerator, Matcher, subsample_labels, StandardRPNHead, find_top_rpn_proposals); the matcher
is also checked against a plain-Python loop, proposals against per-level `nms` merged by score, and the
reference tests against torchvision / a torch replica of detectron2's head and proposal code.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bob_jax import ops
from bob_jax.detection.anchors import AnchorGenerator, cell_anchors
from bob_jax.detection.box_coder import DEFAULT_SCALE_CLAMP, BoxCoder, giou_loss, smooth_l1_loss
from bob_jax.detection.matcher import Matcher, sample_labels
from bob_jax.detection.rpn import (
    RPN,
    RPNConfig,
    RPNHead,
    label_and_sample_anchors,
    rpn_losses,
    rpn_proposals,
)

RPN_MATCHER = Matcher((0.3, 0.7), (0, -1, 1), allow_low_quality_matches=True)


pytestmark = pytest.mark.usefixtures("fast_compile")


# ---------------------------------------------------------------------------------------------- box coder


def test_box_coder_encode_hand_numbers():
    src = jnp.array([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), size 10 x 20
    target = jnp.array([[2.0, 4.0, 22.0, 24.0]])  # centre (12, 14), size 20 x 20
    np.testing.assert_allclose(BoxCoder().encode(src, target), [[0.7, 0.2, math.log(2.0), 0.0]], rtol=1e-6)
    np.testing.assert_allclose(
        BoxCoder((10.0, 10.0, 5.0, 5.0)).encode(src, target), [[7.0, 2.0, 5 * math.log(2.0), 0.0]], rtol=1e-6
    )


def test_box_coder_decode_hand_numbers_clamp_and_class_specific():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    box = jnp.array([[0.0, 0.0, 10.0, 20.0]])
    # class 0: the encode example above; class 1: dw = 10 / 5 = 2 -> width 10 e^2, dh clamped at log(62.5).
    deltas = jnp.array([[7.0, 2.0, 5 * math.log(2.0), 0.0, 0.0, 0.0, 10.0, 100.0]])
    w1, h1 = 10 * math.exp(2.0), 20 * 62.5
    expected = [[2.0, 4.0, 22.0, 24.0, 5 - w1 / 2, 10 - h1 / 2, 5 + w1 / 2, 10 + h1 / 2]]
    np.testing.assert_allclose(coder.decode(deltas, box), expected, rtol=1e-6)
    assert DEFAULT_SCALE_CLAMP == pytest.approx(math.log(62.5))


def test_box_coder_round_trip():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 500, (2, 50, 2))
    src = np.concatenate([xy, xy + rng.uniform(4, 300, (2, 50, 2))], axis=-1).astype(np.float32)
    target = src + rng.normal(size=src.shape).astype(np.float32) * 10.0
    target[..., 2:] = np.maximum(target[..., 2:], target[..., :2] + 1.0)

    @jax.jit
    def round_trips(src, target):
        coders = [
            BoxCoder(w) for w in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (30.0, 30.0, 15.0, 15.0)]
        ]
        return [c.decode(c.encode(src, target), src) for c in coders]

    for decoded in round_trips(src, target):
        np.testing.assert_allclose(decoded, target, atol=2e-3)


def test_box_coder_rejects_bad_input():
    with pytest.raises(ValueError, match="wx, wy, ww, wh"):
        BoxCoder((1.0, 1.0))
    with pytest.raises(ValueError, match="multiple of 4"):
        BoxCoder().decode(jnp.zeros((2, 6)), jnp.zeros((2, 4)))


def test_smooth_l1_and_giou_hand_numbers():
    pred, target = jnp.array([0.5, 2.0, -3.0]), jnp.zeros(3)
    np.testing.assert_allclose(smooth_l1_loss(pred, target, beta=1.0), [0.125, 1.5, 2.5])
    np.testing.assert_allclose(smooth_l1_loss(pred, target, beta=0.0), [0.5, 2.0, 3.0])
    # (0,0,2,2) vs (1,1,3,3): IoU 1/7, hull 9, GIoU = 1/7 - 2/9 = -5/63; disjoint (0,0,1,1) vs (2,0,3,1):
    # IoU 0, union 2, hull 3 -> GIoU -1/3; identical boxes -> 0.
    boxes = jnp.array([[0.0, 0, 2, 2], [0, 0, 1, 1], [1, 2, 5, 7]])
    targets = jnp.array([[1.0, 1, 3, 3], [2, 0, 3, 1], [1, 2, 5, 7]])
    np.testing.assert_allclose(giou_loss(boxes, targets), [68 / 63, 4 / 3, 0.0], rtol=1e-6, atol=1e-6)


def test_giou_loss_equals_shared_op_on_pairs():
    k1, k2 = jax.random.split(jax.random.key(1))
    a = jax.random.uniform(k1, (64, 4), maxval=100.0)
    b = jax.random.uniform(k2, (64, 4), maxval=100.0)
    a = jnp.concatenate([jnp.minimum(a[:, :2], a[:, 2:]), jnp.maximum(a[:, :2], a[:, 2:]) + 1.0], axis=1)
    b = jnp.concatenate([jnp.minimum(b[:, :2], b[:, 2:]), jnp.maximum(b[:, :2], b[:, 2:]) + 1.0], axis=1)
    np.testing.assert_allclose(giou_loss(a, b), 1.0 - jnp.diag(ops.generalized_box_iou(a, b)), atol=1e-5)


@pytest.mark.reference
def test_giou_loss_matches_torchvision(reference):
    import torch
    import torchvision

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (2, 40, 2)).astype(np.float32)
    wh = rng.uniform(1, 50, (2, 40, 2)).astype(np.float32)
    a, b = (np.concatenate([xy[i], xy[i] + wh[i]], axis=1) for i in range(2))
    expected = torchvision.ops.generalized_box_iou_loss(torch.from_numpy(a), torch.from_numpy(b), eps=1e-7)
    np.testing.assert_allclose(
        giou_loss(jnp.asarray(a), jnp.asarray(b)), expected.numpy(), rtol=1e-5, atol=1e-6
    )


# ------------------------------------------------------------------------------------------------ anchors


def test_cell_anchors_hand_numbers():
    # size 32: ratio 0.5 -> w = sqrt(2048) = 45.254834, h = 22.627417; ratio 1 -> 32 x 32; ratio 2 -> transposed.
    a, b = 22.627417, 11.3137085
    expected = [[-a, -b, a, b], [-16.0, -16.0, 16.0, 16.0], [-b, -a, b, a]]
    np.testing.assert_allclose(cell_anchors([32], [0.5, 1.0, 2.0]), expected, rtol=1e-6)


def test_anchor_generator_hand_example():
    gen = AnchorGenerator()
    assert gen.num_anchors == 3
    # A 8 x 8 image: p2 is 2 x 2 at stride 4, p3..p6 are 1 x 1.
    levels = gen([(2, 2), (1, 1), (1, 1), (1, 1), (1, 1)])
    assert [lv.shape for lv in levels] == [(12, 4), (3, 4), (3, 4), (3, 4), (3, 4)]
    assert all(lv.dtype == np.float32 for lv in levels)
    a, b = 22.627417, 11.3137085  # half sides of the size-32 ratio-0.5 anchor
    # Locations row-major (y outer, x inner): (x, y) = (0, 0), (4, 0), (0, 4), (4, 4); ratios 0.5, 1, 2 each.
    expected_p2 = [
        [-a, -b, a, b], [-16, -16, 16, 16], [-b, -a, b, a],
        [4 - a, -b, 4 + a, b], [-12, -16, 20, 16], [4 - b, -a, 4 + b, a],
        [-a, 4 - b, a, 4 + b], [-16, -12, 16, 20], [-b, 4 - a, b, 4 + a],
        [4 - a, 4 - b, 4 + a, 4 + b], [-12, -12, 20, 20], [4 - b, 4 - a, 4 + b, 4 + a],
    ]  # fmt: skip
    np.testing.assert_allclose(levels[0], expected_p2, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(levels[4][1], [-256, -256, 256, 256])  # p6: size 512, ratio 1
    np.testing.assert_allclose(levels[1][0], [-45.254834, -22.627417, 45.254834, 22.627417], rtol=1e-6)


def test_anchor_generator_offset_and_grid_order():
    gen = AnchorGenerator(sizes=((16,),), aspect_ratios=(1.0,), strides=(8,), offset=0.5)
    (anchors,) = gen([(2, 3)])
    # centres (8x + 4, 8y + 4), x fastest
    centres = [(4, 4), (12, 4), (20, 4), (4, 12), (12, 12), (20, 12)]
    np.testing.assert_allclose(anchors, [[x - 8, y - 8, x + 8, y + 8] for x, y in centres])


def test_anchor_generator_rejects_bad_config():
    with pytest.raises(ValueError, match="one size tuple per level"):
        AnchorGenerator(sizes=((32,),), strides=(4, 8))
    with pytest.raises(ValueError, match="feature maps"):
        AnchorGenerator()([(2, 2)])


# ------------------------------------------------------------------------------------------------ matcher


def _loop_matcher(quality, valid, thresholds, labels, low_quality):
    """detectron2 Matcher.__call__ written as plain loops, on the valid rows only."""
    quality = np.asarray(quality)[np.asarray(valid)]
    n = quality.shape[1]
    if quality.shape[0] == 0:
        return np.zeros(n, np.int64), np.full(n, labels[0])
    rows = np.flatnonzero(valid)
    idx, out = np.zeros(n, np.int64), np.zeros(n, np.int64)
    bounds = [-np.inf, *thresholds, np.inf]
    for j in range(n):
        best = max(range(quality.shape[0]), key=lambda g: (quality[g, j], -g))
        idx[j] = rows[best]
        for label, low, high in zip(labels, bounds[:-1], bounds[1:]):
            if low <= quality[best, j] < high:
                out[j] = label
    if low_quality:
        for g in range(quality.shape[0]):
            for j in range(n):
                if quality[g, j] == quality[g].max():
                    out[j] = 1
    return idx, out


def test_matcher_hand_case_low_quality_and_padding():
    quality = jnp.array(
        [
            [0.80, 0.50, 0.20, 0.10, 0.00, 0.35, 0.40],  # gt 0: best 0.80 at pred 0
            [0.10, 0.60, 0.25, 0.60, 0.00, 0.10, 0.55],  # gt 1: best 0.60 at preds 1 and 3 (a tie)
            [0.99, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99],  # padding: must never match
        ]
    )
    valid = jnp.array([True, True, False])
    idx, labels = Matcher((0.3, 0.7), (0, -1, 1))(quality, valid)
    np.testing.assert_array_equal(idx, [0, 1, 1, 1, 0, 0, 1])
    np.testing.assert_array_equal(labels, [1, -1, 0, -1, 0, -1, -1])
    idx, labels = RPN_MATCHER(quality, valid)
    np.testing.assert_array_equal(idx, [0, 1, 1, 1, 0, 0, 1])  # low-quality positives keep their argmax
    np.testing.assert_array_equal(labels, [1, 1, 0, 1, 0, -1, -1])
    # RoI-head matcher: one threshold, IoU >= 0.5 foreground
    _, labels = Matcher((0.5,), (0, 1))(quality, valid)
    np.testing.assert_array_equal(labels, [1, 1, 0, 1, 0, 0, 1])


def test_matcher_without_valid_ground_truth_is_all_background():
    quality = jnp.full((2, 5), 0.9)
    idx, labels = RPN_MATCHER(quality, jnp.array([False, False]))
    np.testing.assert_array_equal(labels, np.zeros(5))
    np.testing.assert_array_equal(idx, np.zeros(5))
    idx, labels = RPN_MATCHER(jnp.zeros((2, 0, 5)), jnp.zeros((2, 0), bool))  # no ground-truth slots
    assert idx.shape == labels.shape == (2, 5) and not np.any(labels) and not np.any(idx)


def test_matcher_equals_loop_implementation_on_random_cases():
    rng = np.random.default_rng(0)
    quality = np.round(rng.uniform(0, 1, (4, 6, 40)), 1).astype(np.float32)  # rounding creates ties
    valid = rng.uniform(size=(4, 6)) < 0.6
    valid[0] = False
    for low_quality in (False, True):
        matcher = Matcher((0.3, 0.7), (0, -1, 1), allow_low_quality_matches=low_quality)
        idx, labels = matcher(jnp.asarray(quality), jnp.asarray(valid))  # batched leading axis
        for b in range(4):
            exp_idx, exp_labels = _loop_matcher(quality[b], valid[b], (0.3, 0.7), (0, -1, 1), low_quality)
            np.testing.assert_array_equal(labels[b], exp_labels)
            np.testing.assert_array_equal(idx[b], exp_idx)


def test_matcher_rejects_bad_config():
    with pytest.raises(ValueError, match="one label per IoU interval"):
        Matcher((0.3, 0.7), (0, 1))
    with pytest.raises(ValueError, match="increasing"):
        Matcher((0.7, 0.3), (0, -1, 1))
    with pytest.raises(ValueError, match=r"\[\.\.\., G, N\]"):
        RPN_MATCHER(jnp.zeros((3, 5)), jnp.ones((2,), bool))


# ------------------------------------------------------------------------------------------------ sampler


def _labels(num_pos, num_neg, length, seed=0):
    labels = np.array([1] * num_pos + [0] * num_neg + [-1] * (length - num_pos - num_neg))
    return jnp.asarray(np.random.default_rng(seed).permutation(labels))


_sample = jax.jit(sample_labels, static_argnums=(2, 3, 4))


@pytest.mark.parametrize(
    "num_pos, num_neg, expected_pos, expected_neg",
    [(300, 1000, 128, 128), (20, 1000, 20, 236), (10, 5, 10, 5), (0, 400, 0, 256)],
)
def test_sample_labels_counts(num_pos, num_neg, expected_pos, expected_neg):
    labels = _labels(num_pos, num_neg, 1400)
    mask = _sample(jax.random.key(3), labels, 256, 0.5, 0)
    assert int((labels == -1).sum()) >= 50
    assert int((mask & (labels == 1)).sum()) == expected_pos
    assert int((mask & (labels == 0)).sum()) == expected_neg
    assert not bool((mask & (labels == -1)).any())


def test_sample_labels_other_background_label_and_determinism():
    # RoI-head style: classes 0..C-1 foreground, C = 3 background, -1 ignored; 25% of 16 -> 4 positives.
    labels = jnp.asarray(np.random.default_rng(1).permutation([0, 1, 2] * 10 + [3] * 40 + [-1] * 5))
    mask = _sample(jax.random.key(0), labels, 16, 0.25, 3)
    assert int((mask & (labels >= 0) & (labels < 3)).sum()) == 4
    assert int((mask & (labels == 3)).sum()) == 12
    np.testing.assert_array_equal(mask, _sample(jax.random.key(0), labels, 16, 0.25, 3))
    assert not np.array_equal(mask, _sample(jax.random.key(1), labels, 16, 0.25, 3))


def test_sample_labels_is_uniform():
    labels = _labels(40, 60, 100)
    sample_many = jax.jit(jax.vmap(lambda k: sample_labels(k, labels, 16, 0.5)))
    masks = sample_many(jax.random.split(jax.random.key(5), 2000))
    freq = np.asarray(masks).mean(axis=0)
    labels = np.asarray(labels)
    np.testing.assert_allclose(freq[labels == 1], 8 / 40, atol=0.05)
    np.testing.assert_allclose(freq[labels == 0], 8 / 60, atol=0.05)


def test_sample_labels_rejects_batched_labels():
    with pytest.raises(ValueError, match="vmap"):
        sample_labels(jax.random.key(0), jnp.zeros((2, 5), jnp.int32), 4, 0.5)


# --------------------------------------------------------------------------------------------------- head


def test_rpn_head_names_init_and_output_order():
    head = RPNHead(8, 3, conv_dims=(-1, -1), rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(head, nnx.Param))
    assert set(params) == {"conv", "objectness_logits", "anchor_deltas"}
    assert set(params["conv"]) == {"conv0", "conv1"}
    assert params["anchor_deltas"]["kernel"].shape == (1, 1, 8, 12)
    kernels = np.concatenate(
        [np.ravel(p["kernel"]) for p in (*params["conv"].values(), params["anchor_deltas"])]
    )
    assert abs(kernels.std() - 0.01) < 0.001 and abs(kernels.mean()) < 0.001
    assert not np.any(params["conv"]["conv0"]["bias"]) and not np.any(params["objectness_logits"]["bias"])
    assert "conv" in nnx.to_pure_dict(nnx.state(RPNHead(8, 3, rngs=nnx.Rngs(0)), nnx.Param))

    graphdef, state = nnx.split(head)

    @jax.jit
    def forward(state, x):
        head = nnx.merge(graphdef, state)
        t = jax.nn.relu(head.conv.conv1(jax.nn.relu(head.conv.conv0(x))))  # the head's layers by hand
        return head([x, x[:, :2, :2]]), (head.objectness_logits(t), head.anchor_deltas(t))

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5, 8)).astype(np.float32))
    (logits, deltas), (raw_logits, raw_deltas) = forward(state, x)
    assert [v.shape for v in logits] == [(2, 45), (2, 12)]
    assert [v.shape for v in deltas] == [(2, 45, 4), (2, 12, 4)]
    y, xx, a = 2, 3, 1  # flattened index (y * W + x) * A + a, the anchors' order
    i = (y * 5 + xx) * 3 + a
    np.testing.assert_allclose(logits[0][1, i], raw_logits[1, y, xx, a], rtol=1e-6)
    np.testing.assert_allclose(deltas[0][1, i], raw_deltas[1, y, xx, 4 * a : 4 * a + 4], rtol=1e-6)


@pytest.mark.reference
def test_rpn_head_matches_torch_replica(reference):
    import torch

    rng = np.random.default_rng(1)
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: RPNHead(6, 3, conv_dims=(-1, -1), rngs=nnx.Rngs(1)))
    )
    head = nnx.merge(
        graphdef, jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.1, a.shape), a.dtype), abstract)
    )

    def torch_conv(conv):
        kernel = np.array(conv.kernel[...])
        layer = torch.nn.Conv2d(
            kernel.shape[2], kernel.shape[3], kernel.shape[0], padding=kernel.shape[0] // 2
        )
        layer.weight.data = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
        layer.bias.data = torch.from_numpy(np.array(conv.bias[...]))
        return layer

    shared = torch.nn.Sequential(
        torch_conv(head.conv.conv0), torch.nn.ReLU(), torch_conv(head.conv.conv1), torch.nn.ReLU()
    )
    x = np.random.default_rng(0).normal(size=(2, 4, 5, 6)).astype(np.float32)
    with torch.no_grad():  # detectron2 StandardRPNHead.forward + RPN.forward's permutes
        t = shared(torch.from_numpy(x.transpose(0, 3, 1, 2)))
        logits = torch_conv(head.objectness_logits)(t).permute(0, 2, 3, 1).flatten(1)
        d = torch_conv(head.anchor_deltas)(t)
        d = d.view(2, 3, 4, 4, 5).permute(0, 3, 4, 1, 2).flatten(1, -2)
    ours_logits, ours_deltas = nnx.jit(lambda head, x: head([x]))(head, jnp.asarray(x))
    np.testing.assert_allclose(ours_logits[0], logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(ours_deltas[0], d.numpy(), atol=1e-5)


def test_rpn_head_rejects_bad_conv_dims():
    with pytest.raises(ValueError, match="conv_dims"):
        RPNHead(8, 3, conv_dims=(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="positive or -1"):
        RPNHead(8, 3, conv_dims=(-1, 0), rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------------------------- losses


def test_label_and_sample_anchors_constructed_case():
    # 6 anchors; image 0 has one GT equal to anchor 2 and a padding row; image 1 has no valid GT.
    anchors = jnp.array(
        [
            [0, 0, 10, 10],
            [20, 20, 30, 30],
            [40, 40, 60, 60],
            [42, 40, 62, 60],
            [0, 40, 10, 50],
            [50, 0, 60, 10],
        ],
        jnp.float32,
    )
    gt = jnp.array([[[40, 40, 60, 60], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]], jnp.float32)
    valid = jnp.array([[True, False], [False, False]])
    labels, matched = _label_and_sample(jax.random.key(0), anchors, gt, valid, matcher=RPN_MATCHER)
    # anchor 3 overlaps the GT with IoU 18*20 / (2*400 - 360) = 0.818 -> positive too
    np.testing.assert_array_equal(labels, [[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_allclose(matched[0], np.tile([40, 40, 60, 60], (6, 1)))
    np.testing.assert_allclose(matched[1], 0.0)
    # With 2 samples per image at 50 %: one positive and one negative are kept in image 0.
    labels, _ = _label_and_sample(
        jax.random.key(0), anchors, gt, valid, matcher=RPN_MATCHER, batch_size_per_image=2
    )
    assert int((labels[0] == 1).sum()) == 1 and int((labels[0] == 0).sum()) == 1
    assert int((labels[1] == 0).sum()) == 2 and int((labels[1] == 1).sum()) == 0


_losses = jax.jit(
    rpn_losses, static_argnames=("box_coder", "batch_size_per_image", "box_reg_loss_type", "smooth_l1_beta")
)
_label_and_sample = jax.jit(
    label_and_sample_anchors, static_argnames=("matcher", "batch_size_per_image", "positive_fraction")
)


def _loss_case():
    anchors = jnp.array([[0, 0, 10, 10], [20, 20, 40, 30], [5, 5, 25, 45], [0, 0, 8, 8]], jnp.float32)
    matched = jnp.array(
        [[[1, 1, 11, 12], [22, 18, 41, 33], [0, 0, 0, 0], [0, 0, 0, 0]],
         [[0, 0, 0, 0], [0, 0, 0, 0], [6, 4, 20, 40], [0, 0, 0, 0]]],
        jnp.float32,
    )  # fmt: skip
    gt_labels = jnp.array([[1, 1, 0, -1], [0, -1, 1, 0]])
    return anchors, matched, gt_labels


def test_rpn_losses_perfect_and_offset_predictions():
    anchors, matched, gt_labels = _loss_case()
    coder = BoxCoder()
    perfect = coder.encode(anchors, jnp.where(gt_labels[..., None] == 1, matched, anchors))
    logits = jnp.where(gt_labels == 1, 2.0, -1.0)

    def losses(deltas, **kwargs):
        return _losses(
            anchors, logits, deltas, gt_labels, matched, box_coder=coder, batch_size_per_image=4, **kwargs
        )

    # 3 positives at logit 2, 3 negatives at logit -1, normaliser 2 images * 4
    expected_cls = (3 * math.log1p(math.exp(-2.0)) + 3 * math.log1p(math.exp(-1.0))) / 8
    np.testing.assert_allclose(losses(perfect)["loss_rpn_cls"], expected_cls, rtol=1e-6)
    assert float(losses(perfect)["loss_rpn_loc"]) < 1e-6
    # smooth-L1 with beta 0 (L1): each coordinate of each positive off by 0.1 -> 3 * 4 * 0.1 / 8
    np.testing.assert_allclose(losses(perfect + 0.1)["loss_rpn_loc"], 3 * 4 * 0.1 / 8, rtol=1e-5)
    # beta 1: 0.5 * 0.1^2 per coordinate
    np.testing.assert_allclose(
        losses(perfect + 0.1, smooth_l1_beta=1.0)["loss_rpn_loc"], 3 * 4 * 0.005 / 8, rtol=1e-4
    )
    assert float(losses(perfect, box_reg_loss_type="giou")["loss_rpn_loc"]) < 1e-5


def test_rpn_losses_against_numpy_and_finite_gradients():
    anchors, matched, gt_labels = _loss_case()
    coder = BoxCoder()
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 4)).astype(np.float32) * 3)
    deltas = jnp.asarray(rng.normal(size=(2, 4, 4)).astype(np.float32))
    losses = _losses(anchors, logits, deltas, gt_labels, matched, box_coder=coder, batch_size_per_image=4)
    x, z = np.asarray(logits, np.float64), (np.asarray(gt_labels) == 1).astype(np.float64)
    bce = -(z * np.log(1 / (1 + np.exp(-x))) + (1 - z) * np.log(1 - 1 / (1 + np.exp(-x))))
    np.testing.assert_allclose(losses["loss_rpn_cls"], bce[np.asarray(gt_labels) >= 0].sum() / 8, rtol=1e-5)
    pos = np.asarray(gt_labels) == 1
    a = np.broadcast_to(np.asarray(anchors, np.float64), (2, 4, 4))[pos]
    g = np.asarray(matched, np.float64)[pos]
    aw, ah, gw, gh = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1], g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    target = np.stack(
        [
            (g[:, 0] + gw / 2 - a[:, 0] - aw / 2) / aw,
            (g[:, 1] + gh / 2 - a[:, 1] - ah / 2) / ah,
            np.log(gw / aw),
            np.log(gh / ah),
        ],
        axis=1,
    )
    expected_loc = np.abs(np.asarray(deltas, np.float64)[pos] - target).sum() / 8
    np.testing.assert_allclose(losses["loss_rpn_loc"], expected_loc, rtol=1e-5)
    for loss_type in ("smooth_l1", "giou"):

        def total(logits, deltas, loss_type=loss_type):
            out = rpn_losses(
                anchors, logits, deltas, gt_labels, matched, box_coder=coder, box_reg_loss_type=loss_type
            )
            return out["loss_rpn_cls"] + out["loss_rpn_loc"]

        grads = jax.jit(jax.grad(total, argnums=(0, 1)))(logits, deltas)
        assert all(bool(jnp.isfinite(g).all()) for g in grads)
        np.testing.assert_array_equal(grads[1][gt_labels != 1], 0.0)
    with pytest.raises(ValueError, match="box_reg_loss_type"):
        rpn_losses(anchors, logits, deltas, gt_labels, matched, box_coder=coder, box_reg_loss_type="l2")


# ---------------------------------------------------------------------------------------------- proposals


@functools.partial(jax.jit, static_argnums=(4, 5))
def _proposals(anchors, logits, deltas, image_sizes, pre_nms_topk, post_nms_topk, min_box_size=0.0):
    return rpn_proposals(
        anchors,
        logits,
        deltas,
        image_sizes,
        box_coder=BoxCoder(),
        pre_nms_topk=pre_nms_topk,
        post_nms_topk=post_nms_topk,
        min_box_size=min_box_size,
    )


def _proposal_case():
    """Level 0: 4 x 4 grid, stride 4, 8 x 8 anchors; level 1: 2 x 2 grid, stride 8, 16 x 16 anchors."""
    gen = AnchorGenerator(sizes=((8,), (16,)), aspect_ratios=(1.0,), strides=(4, 8))
    anchors = [jnp.asarray(a) for a in gen([(4, 4), (2, 2)])]
    logits = [jnp.full((1, 16), -5.0), jnp.full((1, 4), -6.0)]
    deltas = [jnp.zeros((1, 16, 4)), jnp.zeros((1, 4, 4))]
    # level 0, anchor 10 (x=2, y=2): box (4, 4, 12, 12), the best score
    logits[0] = logits[0].at[0, 10].set(5.0)
    # level 0, anchor 11 (x=3, y=2) is (8, 4, 16, 12); dx = -0.5 moves it onto (4, 4, 12, 12): a duplicate
    logits[0] = logits[0].at[0, 11].set(4.0)
    deltas[0] = deltas[0].at[0, 11, 0].set(-0.5)
    # level 0, anchor 5 (x=1, y=1) pushed right by 10 widths: clipped to zero width -> dropped
    logits[0] = logits[0].at[0, 5].set(4.5)
    deltas[0] = deltas[0].at[0, 5, 0].set(10.0)
    # level 1, anchor 3 (x=8, y=8) is (0, 0, 16, 16); halved it is the same box as the best, on another level
    logits[1] = logits[1].at[0, 3].set(3.0)
    deltas[1] = deltas[1].at[0, 3, 2:].set(math.log(0.5))
    return anchors, logits, deltas


def test_rpn_proposals_constructed_case():
    anchors, logits, deltas = _proposal_case()
    boxes, scores, valid = _proposals(anchors, logits, deltas, jnp.array([[16, 16]]), 3, 8)
    assert boxes.shape == (1, 8, 4) and scores.shape == (1, 8) and valid.shape == (1, 8)
    # level 0 top-3: anchors 10 (5.0), 5 (4.5, empty after clipping), 11 (4.0, duplicate of 10 -> suppressed);
    # level 1 top-3: anchor 3 (3.0, kept: NMS is per level) and anchors 0, 1 (-6.0; no overlap above 0.7).
    np.testing.assert_array_equal(valid[0], [True, True, True, True, False, False, False, False])
    np.testing.assert_allclose(scores[0, :4], [5.0, 3.0, -6.0, -6.0])
    np.testing.assert_allclose(boxes[0, 0], [4, 4, 12, 12], atol=1e-5)
    np.testing.assert_allclose(boxes[0, 1], [4, 4, 12, 12], atol=1e-5)
    # level-1 anchors 0 and 1, clipped to the image: (-8, -8, 8, 8) -> (0, 0, 8, 8), (0, -8, 16, 8) -> (0, 0, 16, 8)
    np.testing.assert_allclose(sorted(np.asarray(boxes[0, 2:4]).tolist()), [[0, 0, 8, 8], [0, 0, 16, 8]])
    np.testing.assert_array_equal(boxes[0, 4:], 0.0)
    assert bool(jnp.all(jnp.isneginf(scores[0, 4:])))


def test_rpn_proposals_clip_to_each_image_and_min_size():
    anchors, logits, deltas = _proposal_case()
    logits = [jnp.concatenate([v, v]) for v in logits]
    deltas = [jnp.concatenate([v, v]) for v in deltas]
    sizes = jnp.array([[16, 16], [10, 6]])  # image 1 is 10 high, 6 wide
    for min_size in (0.0, 4.0):
        boxes, _, valid = _proposals(anchors, logits, deltas, sizes, 16, 30, min_size)
        assert bool(jnp.all(boxes[1, :, 2] <= 6.0)) and bool(jnp.all(boxes[1, :, 3] <= 10.0))
        assert bool(jnp.all(boxes[0, :, 2:] <= 16.0)) and bool(jnp.all(boxes >= 0.0))
        widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        assert bool(jnp.all((widths > min_size) & (heights > min_size) | ~valid))
        if min_size == 0.0:
            num_valid = int(valid.sum())
    assert int(valid.sum()) < num_valid  # min size 4 drops the small clipped boxes


def _numpy_greedy_nms(boxes, scores, threshold):
    """Plain greedy NMS (torchvision semantics: suppress IoU > threshold), indices by descending score."""
    keep = []
    for i in np.argsort(-scores, kind="stable"):
        ok = True
        for j in keep:
            lt, rb = np.maximum(boxes[i, :2], boxes[j, :2]), np.minimum(boxes[i, 2:], boxes[j, 2:])
            inter = np.prod(np.clip(rb - lt, 0, None))
            union = np.prod(boxes[i, 2:] - boxes[i, :2]) + np.prod(boxes[j, 2:] - boxes[j, :2]) - inter
            ok &= not inter / union > threshold
        if ok:
            keep.append(i)
    return np.array(keep, dtype=np.int64)


def test_rpn_proposals_equal_per_level_numpy_pipeline():
    """find_top_rpn_proposals re-done in NumPy: per-level top-k, decode, clip, per-level greedy NMS, merge."""
    gen = AnchorGenerator(sizes=((16,), (32,), (64,)), strides=(4, 8, 16))
    anchors = gen([(8, 8), (4, 4), (2, 2)])
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(2, a.shape[0])).astype(np.float32) for a in anchors]
    deltas = [rng.normal(size=(2, a.shape[0], 4)).astype(np.float32) * 0.3 for a in anchors]
    sizes = np.array([[32, 32], [25, 30]])
    pre, post = 60, 110
    boxes, scores, valid = _proposals(anchors, logits, deltas, sizes, pre, post)
    for b in range(2):
        cand_boxes, cand_scores = [], []
        for a, lg, dl in zip(anchors, logits, deltas):
            i = np.argsort(-lg[b], kind="stable")[: min(pre, lg.shape[1])]
            a, d = a[i].astype(np.float64), dl[b][i].astype(np.float64)
            w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
            cx, cy = a[:, 0] + w / 2 + d[:, 0] * w, a[:, 1] + h / 2 + d[:, 1] * h
            pw, ph = w * np.exp(d[:, 2]), h * np.exp(d[:, 3])
            bx = np.stack([cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2], axis=1)
            bx = np.clip(bx, 0, [sizes[b, 1], sizes[b, 0], sizes[b, 1], sizes[b, 0]])
            ok = (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])
            keep = np.flatnonzero(ok)[_numpy_greedy_nms(bx[ok], lg[b][i][ok], 0.7)]
            cand_boxes.append(bx[keep])
            cand_scores.append(lg[b][i][keep])
        cand_boxes, cand_scores = np.concatenate(cand_boxes), np.concatenate(cand_scores)
        order = np.argsort(-cand_scores, kind="stable")[:post]
        n = len(order)
        assert int(valid[b].sum()) == n and n < post  # some padding at the end
        np.testing.assert_allclose(scores[b, :n], cand_scores[order])
        np.testing.assert_allclose(boxes[b, :n], cand_boxes[order], atol=1e-4)
        assert not bool(valid[b, n:].any())


def test_rpn_proposals_stop_gradients():
    anchors, logits, deltas = _proposal_case()

    def total(lg, dl):
        boxes, scores, valid = _proposals(anchors, lg, dl, jnp.array([[16, 16]]), 3, 8)
        return jnp.where(valid[..., None], boxes, 0.0).sum() + jnp.where(valid, scores, 0.0).sum()

    grads = jax.jit(jax.grad(total, argnums=(0, 1)))(logits, deltas)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))


# ------------------------------------------------------------------------------------------------- module


def test_rpn_module_jitted_train_step_and_inference():
    config = RPNConfig(
        conv_dims=(-1, -1), pre_nms_topk=(50, 30), post_nms_topk=(40, 20), batch_size_per_image=32
    )
    # Parameter values are irrelevant here (init is tested on RPNHead): fill the abstract model cheaply.
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: RPN(8, config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.01, a.shape).astype(a.dtype)), abstract)
    features = {
        f"p{i}": jnp.asarray(rng.normal(size=(2, 64 // 2**i, 64 // 2**i, 8)), jnp.float32)
        for i in range(2, 7)
    }
    sizes = jnp.array([[64, 64], [48, 56]])
    gt_boxes = jnp.array([[[4, 4, 40, 30], [0, 0, 0, 0]], [[10, 8, 20, 44], [30, 30, 50, 46]]], jnp.float32)
    gt_valid = jnp.array([[True, False], [True, True]])

    @jax.jit
    def step(params, key):
        def loss_fn(params):
            proposals, losses = nnx.merge(graphdef, params)(
                features, sizes, training=True, gt_boxes=gt_boxes, gt_valid=gt_valid, key=key
            )
            return losses["loss_rpn_cls"] + losses["loss_rpn_loc"], (proposals, losses)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (_, (proposals, losses)), grads = step(params, jax.random.key(1))
    # Initial logits are ~0: BCE ~ log 2 over all 2 * 32 sampled anchors.
    np.testing.assert_allclose(losses["loss_rpn_cls"], math.log(2.0), rtol=0.05)
    assert proposals["boxes"].shape == (2, 40, 4) and bool(proposals["valid"].all())
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    proposals, losses = jax.eval_shape(
        lambda p: nnx.merge(graphdef, p)(features, sizes, training=False), params
    )
    assert losses == {} and proposals["boxes"].shape == (2, 20, 4) and proposals["valid"].shape == (2, 20)
    model = nnx.merge(graphdef, params)
    with pytest.raises(ValueError, match="gt_boxes, gt_valid and a key"):
        model(features, sizes, training=True)
    with pytest.raises(KeyError, match="p6"):
        model({k: v for k, v in features.items() if k != "p6"}, sizes, training=False)
