"""RoI heads and test-time postprocessing: sampling, targets, losses, heads, cascade, detections.

Expected values are computed independently: IoUs and box deltas in plain numpy, cross-entropy and BCE
from their formulas, mask targets from the RoIAlign geometry by hand (sample points on pixel centres),
the detections of `postprocess.detect` written out for a constructed case, and the conv heads against
torch replicas of detectron2's layers (reference tests).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bob_jax.detection import postprocess
from bob_jax.detection import roi_heads as rh
from bob_jax.detection.box_coder import BoxCoder


pytestmark = pytest.mark.usefixtures("fast_compile")


NUM_CLASSES = 2
CHANNELS = 64
IMAGE = 64


def _np_iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def _np_encode(src, dst, weights):
    wx, wy, ww, wh = weights
    sw, sh = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
    dw, dh = dst[:, 2] - dst[:, 0], dst[:, 3] - dst[:, 1]
    sx, sy = src[:, 0] + 0.5 * sw, src[:, 1] + 0.5 * sh
    dx, dy = dst[:, 0] + 0.5 * dw, dst[:, 1] + 0.5 * dh
    return np.stack(
        [wx * (dx - sx) / sw, wy * (dy - sy) / sh, ww * np.log(dw / sw), wh * np.log(dh / sh)], -1
    )


# ------------------------------------------------------------------------------------------ RoI sampling


def _sampling_case():
    """Image 0: 10 proposals on GT 0 (class 1), 3 on GT 1 (class 0), 20 far away, 2 invalid ones on GT 0.
    Image 1: no ground truth at all."""
    gt = np.array([[10, 10, 50, 50], [100, 100, 140, 160], [0, 0, 0, 0]], np.float32)
    on0 = np.array([[10 + d, 10, 50 + d, 50] for d in range(10)], np.float32)  # IoU >= 0.64
    on1 = np.array([[100, 100 + d, 140, 160 + d] for d in (0, 4, 8)], np.float32)
    far = np.array([[200 + 3 * d, 200, 240 + 3 * d, 240] for d in range(20)], np.float32)
    invalid = on0[:2] + 1
    proposals = np.concatenate([on0, on1, far, invalid])
    valid = np.arange(len(proposals)) < 33
    return (
        jnp.asarray(np.stack([proposals, proposals])),
        jnp.asarray(np.stack([valid, valid])),
        jnp.asarray(np.stack([gt, gt])),
        jnp.asarray(np.array([[1, 0, -1], [-1, -1, -1]], np.int32)),
    )


@pytest.mark.parametrize("num_samples, expected_pos, expected_neg", [(16, 4, 12), (64, 15, 20)])
def test_sample_rois_counts_and_targets(num_samples, expected_pos, expected_neg):
    proposals, valid, gt_boxes, gt_classes = _sampling_case()
    sample = jax.jit(
        rh.sample_rois, static_argnames=("num_classes", "batch_size_per_image", "positive_fraction")
    )
    out = sample(
        jax.random.key(3),
        proposals,
        valid,
        gt_boxes,
        gt_classes,
        num_classes=NUM_CLASSES,
        batch_size_per_image=num_samples,
        positive_fraction=0.25,
    )
    assert out.boxes.shape == (2, num_samples, 4) and out.classes.shape == (2, num_samples)
    fg = np.asarray(out.foreground(NUM_CLASSES))
    classes, v = np.asarray(out.classes), np.asarray(out.valid)
    # Image 0: 10 + 3 valid proposals plus the 2 appended GT boxes are positive, capped at int(R / 4).
    assert fg[0].sum() == expected_pos and (v[0] & ~fg[0]).sum() == expected_neg
    # Positives first, then negatives, then padding.
    assert fg[0, :expected_pos].all() and v[0, : expected_pos + expected_neg].all()
    assert not v[0, expected_pos + expected_neg :].any() and (classes[0][~v[0]] == -1).all()
    assert (classes[0][v[0] & ~fg[0]] == NUM_CLASSES).all()
    # Targets against numpy IoUs: class and box of the best GT, the proposal box itself unchanged.
    boxes = np.asarray(out.boxes[0])
    iou = _np_iou(np.asarray(gt_boxes[0, :2]), boxes)
    best = iou.argmax(0)
    np.testing.assert_array_equal(fg[0], v[0] & (iou.max(0) >= 0.5))
    np.testing.assert_array_equal(classes[0][fg[0]], np.array([1, 0])[best[fg[0]]])
    np.testing.assert_array_equal(np.asarray(out.gt_boxes[0])[fg[0]], np.asarray(gt_boxes[0])[best[fg[0]]])
    candidates = np.concatenate([np.asarray(proposals[0, :33]), np.asarray(gt_boxes[0, :2])])
    assert all((candidates == b).all(-1).any() for b in boxes[v[0]])  # never an invalid proposal
    # Image 1 without ground truth: background only, min(33, R) of them.
    assert not fg[1].any() and v[1].sum() == min(33, num_samples)
    assert (classes[1][v[1]] == NUM_CLASSES).all()


def test_label_rois_relabels_without_sampling():
    proposals, valid, gt_boxes, gt_classes = _sampling_case()
    out = jax.jit(rh.label_rois, static_argnames=("num_classes", "iou_threshold"))(
        proposals, valid, gt_boxes, gt_classes, num_classes=NUM_CLASSES, iou_threshold=0.7
    )
    iou = _np_iou(np.asarray(gt_boxes[0, :2]), np.asarray(proposals[0]))
    expected = np.where(iou.max(0) >= 0.7, np.array([1, 0])[iou.argmax(0)], NUM_CLASSES)
    expected[~np.asarray(valid[0])] = -1
    np.testing.assert_array_equal(out.classes[0], expected)
    np.testing.assert_array_equal(out.boxes, proposals)
    assert (np.asarray(out.classes[1])[np.asarray(valid[1])] == NUM_CLASSES).all()


# ---------------------------------------------------------------------------------------- mask targets


def test_mask_target_of_a_square_is_its_exact_crop():
    masks = np.zeros((1, 2, IMAGE, IMAGE), np.uint8)
    masks[0, 1, 14:42, 14:42] = 1  # the square; slot 0 is another instance elsewhere
    masks[0, 0, 50:60, 0:10] = 1
    # 56 px over 28 bins: 2 x 2 samples per bin on integer pixel positions -> the 2 x 2 block mean.
    # The square's 28 x 28 box: all ones. Box (28, 28, 56, 56): 1 px bins, the square covers 14 x 14.
    boxes = jnp.array([[[0.0, 0.0, 56.0, 56.0], [14.0, 14.0, 42.0, 42.0], [28.0, 28.0, 56.0, 56.0]]])
    targets = jax.jit(rh.mask_targets, static_argnames="mask_size")
    out = np.asarray(targets(jnp.asarray(masks), jnp.array([[1, 1, 1]]), boxes, 28))
    expected = np.zeros((3, 28, 28), np.float32)
    expected[0, 7:21, 7:21] = 1
    expected[1] = 1
    expected[2, :14, :14] = 1
    np.testing.assert_array_equal(out[0], expected)
    # A box straddling the edge by half a block: 2x2 block means of 0.5 count as foreground (>= 0.5).
    half = np.asarray(targets(jnp.asarray(masks), jnp.array([[1]]), jnp.array([[[1.0, 1.0, 57.0, 57.0]]])))
    expected_half = np.zeros((28, 28), np.float32)
    expected_half[6:21, 6:21] = 1  # blocks [13, 15) .. [41, 43) overlap the square by >= half per side,
    expected_half[[6, 6, 20, 20], [6, 20, 6, 20]] = 0  # the corner blocks only by a quarter
    np.testing.assert_array_equal(half[0, 0], expected_half)


# ------------------------------------------------------------------------- box head, predictor, losses


def _rois_for_losses():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 40, (2, 8, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(8, 24, (2, 8, 2))], -1).astype(np.float32)
    gt = (boxes + rng.normal(0, 2, boxes.shape)).astype(np.float32)
    classes = np.array([[0, 1, 2, 2, 1, -1, 0, 2], [2, 2, 1, 0, -1, -1, 2, 2]], np.int32)
    valid = classes >= 0
    targets = rh.RoiTargets(
        jnp.asarray(boxes),
        jnp.asarray(valid),
        jnp.asarray(classes),
        jnp.asarray(gt),
        jnp.zeros((2, 8), jnp.int32),
    )
    return targets, boxes, gt, classes, valid


def test_box_head_predictor_losses_match_numpy_and_give_finite_grads():
    targets, boxes, gt, classes, valid = _rois_for_losses()
    head = rh.BoxHead(8, pooled_size=7, num_convs=2, conv_dim=8, fc_dims=(32,), rngs=nnx.Rngs(0))
    predictor = rh.FastRCNNPredictor(32, NUM_CLASSES, class_agnostic=False, rngs=nnx.Rngs(1))
    # Larger predictor weights than detectron2's init, so that logits and deltas are far from zero.
    predictor.cls_score.kernel[...] = predictor.cls_score.kernel[...] * 50
    predictor.bbox_pred.kernel[...] = predictor.bbox_pred.kernel[...] * 500
    pooled = jax.random.normal(jax.random.key(2), (16, 7, 7, 8))
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))

    def loss_fn(modules, box_loss):
        head, predictor = modules
        logits, deltas = predictor(head(pooled))
        losses = rh.fast_rcnn_losses(
            logits.reshape(2, 8, -1),
            deltas.reshape(2, 8, -1),
            targets,
            num_classes=NUM_CLASSES,
            box_coder=coder,
            box_loss=box_loss,
            box_loss_weight=2.0,
        )
        return losses["loss_cls"] + losses["loss_box_reg"], (losses, logits, deltas)

    def grad_fn(modules, box_loss):
        fn = nnx.value_and_grad(functools.partial(loss_fn, box_loss=box_loss), has_aux=True)
        return nnx.jit(fn)(modules)

    (_, (losses, logits, deltas)), grads = grad_fn((head, predictor), "smooth_l1")
    logits, deltas = np.asarray(logits).reshape(2, 8, 3), np.asarray(deltas).reshape(2, 8, 2, 4)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, np.maximum(classes, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(losses["loss_cls"], ce[valid].mean(), rtol=1e-5)
    fg = valid & (classes < NUM_CLASSES)
    pred = deltas[fg, classes[fg]]
    l1 = np.abs(pred - _np_encode(boxes[fg], gt[fg], (10, 10, 5, 5))).sum()
    np.testing.assert_allclose(losses["loss_box_reg"], 2.0 * l1 / valid.sum(), rtol=1e-5)
    leaves = jax.tree.leaves(nnx.state(grads))
    assert leaves and all(np.isfinite(g).all() for g in leaves)
    assert all(np.abs(g).sum() > 0 for g in leaves)  # every parameter receives gradient

    (_, (giou_losses, _, _)), giou_grads = grad_fn((head, predictor), "giou")
    assert np.isfinite(giou_losses["loss_box_reg"]) and giou_losses["loss_box_reg"] > 0
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(nnx.state(giou_grads)))


def test_mask_loss_is_bce_of_the_gt_class_over_positives():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (2, 3, 4, 4, NUM_CLASSES)).astype(np.float32)
    targets = (rng.uniform(size=(2, 3, 4, 4)) > 0.5).astype(np.float32)
    classes = np.array([[1, 0, 2], [0, -1, 1]])
    fg = np.array([[True, True, False], [True, False, False]])
    got = rh.mask_loss(jnp.asarray(logits), jnp.asarray(classes), jnp.asarray(fg), jnp.asarray(targets))
    x = np.take_along_axis(logits, np.clip(classes, 0, 1)[..., None, None, None], -1)[..., 0][fg]
    y = targets[fg]
    bce = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
    np.testing.assert_allclose(got, bce.mean(), rtol=1e-6)
    assert (
        rh.mask_loss(jnp.asarray(logits), jnp.asarray(classes), jnp.zeros((2, 3), bool), jnp.asarray(targets))
        == 0
    )


def test_scale_gradient_scales_only_the_backward_pass():
    x = jnp.arange(3.0)
    assert (rh.scale_gradient(x, 0.25) == x).all()
    np.testing.assert_allclose(jax.grad(lambda t: (rh.scale_gradient(t, 0.25) ** 2).sum())(x), 0.5 * x)


# ----------------------------------------------------------------------------------------- postprocess


def test_detect_keeps_exactly_the_expected_detections():
    a, a2 = [10.0, 10.0, 50.0, 50.0], [12.0, 12.0, 52.0, 52.0]  # IoU 0.82
    far = [100.0, 100.0, 140.0, 140.0]  # clipped by the 120 x 130 (h x w) image to (100, 100, 130, 120)
    boxes = jnp.array(
        [
            [
                [a, a],  # RoI 0: class 0 box, class 1 box
                [a2, far],  # RoI 1
                [far, a2],  # RoI 2
                [a, a],  # RoI 3: invalid
            ]
        ]
    )
    probs = jnp.array(
        [
            [
                [0.70, 0.20, 0.10],
                [0.60, 0.30, 0.10],  # class 0 suppressed by RoI 0 (same class, IoU > 0.5)
                [0.04, 0.90, 0.06],  # class 0 below 0.05; class 1 suppresses RoI 0's class-1 box
                [0.99, 0.99, 0.00],
            ]
        ]
    )
    valid = jnp.array([[True, True, True, False]])
    sizes = jnp.array([[120, 130]])
    detect = jax.jit(postprocess.detect, static_argnames=("max_detections", "max_candidates"))
    out = detect(probs, boxes, valid, sizes, max_detections=5)
    np.testing.assert_array_equal(out["valid"][0], [True, True, True, False, False])
    np.testing.assert_allclose(out["scores"][0], [0.9, 0.7, 0.3, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(out["classes"][0], [1, 0, 1, -1, -1])
    np.testing.assert_allclose(out["boxes"][0, :3], [a2, a, [100, 100, 130, 120]])
    assert (out["boxes"][0, 3:] == 0).all()
    # Truncation to the best max_detections; candidate pre-selection that keeps every passing one.
    top2 = detect(probs, boxes, valid, sizes, max_detections=2, max_candidates=5)
    np.testing.assert_allclose(top2["scores"][0], [0.9, 0.7], rtol=1e-6)
    # Class-agnostic boxes: every class shares the RoI's box.
    agnostic = detect(probs, boxes[:, :, :1], valid, sizes, max_detections=5)
    # RoI 0 class 0 (0.7) suppresses RoI 1 class 0 (a2); class 1: RoI 2 (0.9, far), RoI 1 (0.3, a2) and
    # RoI 0 (0.2, a) overlap -> 0.3 kept over 0.2; far and a2 do not overlap.
    np.testing.assert_allclose(agnostic["scores"][0], [0.9, 0.7, 0.3, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(agnostic["classes"][0], [1, 0, 1, -1, -1])
    np.testing.assert_allclose(agnostic["boxes"][0, :3], [[100, 100, 130, 120], a, a2])


def test_mask_probabilities_pick_the_detected_class():
    logits = jax.random.normal(jax.random.key(0), (1, 3, 4, 4, NUM_CLASSES))
    out = postprocess.mask_probabilities(logits, jnp.array([[1, 0, -1]]))
    np.testing.assert_allclose(out[0, 0], jax.nn.sigmoid(logits[0, 0, ..., 1]))
    np.testing.assert_allclose(out[0, 1], jax.nn.sigmoid(logits[0, 1, ..., 0]))


# ------------------------------------------------------------------------- full heads, under jit


def _tiny_inputs(seed=0, batch=2, num_proposals=32):
    rng = np.random.default_rng(seed)
    features = {
        f"p{k}": jnp.asarray(rng.normal(size=(batch, IMAGE >> k, IMAGE >> k, CHANNELS)).astype(np.float32))
        for k in range(2, 6)
    }
    gt_boxes = np.array([[6, 6, 30, 34], [30, 28, 60, 58], [0, 0, 0, 0]], np.float32)
    gt_boxes = np.stack([gt_boxes, gt_boxes + [0, 0, 0, 0]])[:batch]
    gt_classes = np.array([[0, 1, -1], [1, -1, -1]], np.int32)[:batch]
    gt_masks = np.zeros((batch, 3, IMAGE, IMAGE), np.uint8)
    for b in range(batch):
        for g in range(3):
            if gt_classes[b, g] >= 0:
                x1, y1, x2, y2 = gt_boxes[b, g].astype(int)
                gt_masks[b, g, y1:y2, x1 + 2 : x2 - 2] = 1
    # Proposals jittered around the ground truth (some positive) and random ones.
    picks = gt_boxes[:, rng.integers(0, 2, num_proposals)]
    proposals = picks + rng.normal(0, 4, picks.shape)
    proposals[:, ::3] = rng.uniform(0, 40, (batch, len(range(0, num_proposals, 3)), 4)) + [0, 0, 20, 20]
    proposals = np.concatenate(
        [np.minimum(proposals[..., :2], proposals[..., 2:] - 2), proposals[..., 2:]], -1
    )
    valid = np.ones((batch, num_proposals), bool)
    valid[:, -3:] = False
    targets = {
        "gt_boxes": jnp.asarray(gt_boxes),
        "gt_classes": jnp.asarray(gt_classes),
        "gt_masks": jnp.asarray(gt_masks),
    }
    sizes = jnp.array([[IMAGE, IMAGE], [60, 52]][:batch], jnp.int32)
    return features, jnp.asarray(proposals.astype(np.float32)), jnp.asarray(valid), sizes, targets


TINY = {"conv_dim": 32, "fc_dims": (64,), "mask_conv_dim": 32, "batch_size_per_image": 64}


def _train_and_eval(heads):
    features, proposals, valid, sizes, targets = _tiny_inputs()

    def loss_fn(heads, features):
        losses = heads(features, proposals, valid, sizes, targets, key=jax.random.key(0), train=True)
        return sum(losses.values()), losses

    (total, losses), (grads, feature_grads) = nnx.jit(
        nnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    )(heads, features)
    detections = nnx.jit(lambda h, f: h(f, proposals, valid, sizes, train=False))(heads, features)
    return total, losses, grads, feature_grads, detections


def _check_detections(dets, batch=2):
    assert dets["boxes"].shape == (batch, 100, 4)
    for name in ("scores", "classes", "valid"):
        assert dets[name].shape == (batch, 100)
    assert dets["masks"].shape == (batch, 100, 28, 28)
    v = np.asarray(dets["valid"])
    assert v.any()
    assert ((np.asarray(dets["classes"]) >= 0) == v).all() and (np.asarray(dets["scores"])[v] > 0.05).all()
    boxes = np.asarray(dets["boxes"])
    assert (boxes[1][v[1]][:, 2] <= 52).all() and (boxes[1][v[1]][:, 3] <= 60).all()  # clipped to image 1
    masks = np.asarray(dets["masks"])
    assert ((masks >= 0) & (masks <= 1)).all()


def test_standard_roi_heads_train_and_eval_under_jit():
    cfg = rh.RoIHeadsConfig(num_classes=NUM_CLASSES, **TINY)
    heads = rh.StandardROIHeads(CHANNELS, cfg, rngs=nnx.Rngs(0))
    _, losses, grads, feature_grads, dets = _train_and_eval(heads)
    assert sorted(losses) == ["loss_box_reg", "loss_cls", "loss_mask"]
    assert all(np.isfinite(float(v)) for v in losses.values())
    # Untrained: uniform-ish class probabilities and mask logits near 0 -> log(3) and log(2).
    assert losses["loss_cls"] == pytest.approx(math.log(3), rel=0.05)
    assert losses["loss_mask"] == pytest.approx(math.log(2), rel=0.05)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(nnx.state(grads)))
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(feature_grads))
    assert np.abs(np.asarray(feature_grads["p2"])).sum() > 0
    _check_detections(dets)


def test_cascade_roi_heads_one_step_and_eval_under_jit():
    cfg = rh.cascade_config(NUM_CLASSES, **TINY)
    heads = rh.CascadeROIHeads(CHANNELS, cfg, rngs=nnx.Rngs(0))
    assert heads.box_predictor[0].bbox_pred.kernel.shape == (64, 4)  # class-agnostic
    params = nnx.state(heads, nnx.Param)
    total, losses, grads, _, dets = _train_and_eval(heads)
    expected = {f"{n}_stage{k}" for n in ("loss_cls", "loss_box_reg") for k in range(3)} | {"loss_mask"}
    assert set(losses) == expected
    assert np.isfinite(float(total)) and all(np.isfinite(float(v)) for v in losses.values())
    grad_leaves = jax.tree.leaves(nnx.state(grads))
    assert all(np.isfinite(g).all() for g in grad_leaves)
    # Every stage's head and predictor is trained.
    for k in range(3):
        assert np.abs(np.asarray(grads.box_predictor[k].cls_score.kernel[...])).sum() > 0
        assert np.abs(np.asarray(grads.box_head[k].conv1.kernel[...])).sum() > 0
    # One SGD step changes the parameters by finite amounts.
    new = jax.tree.map(lambda p, g: p - 0.01 * g, params, nnx.state(grads, nnx.Param))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(new))
    _check_detections(dets)


def test_box_only_mmdet_style_cascade_traces_without_masks():
    # The OOD-detection head (Cascade R-CNN without masks) with mmdet's stage handling and GIoU loss:
    # traced only (no compile), which checks the code path, its inputs and its outputs' shapes.
    cfg = rh.cascade_config(
        NUM_CLASSES,
        mask_on=False,
        cascade_sampling="resample",
        stage_loss_weights=(1.0, 0.5, 0.25),
        scale_feature_grad=False,
        box_loss="giou",
        box_loss_weight=10.0,
        **TINY,
    )
    heads = rh.CascadeROIHeads(CHANNELS, cfg, rngs=nnx.Rngs(0))
    assert heads.mask_head is None
    features, proposals, valid, sizes, targets = _tiny_inputs()
    boxes_only = {"gt_boxes": targets["gt_boxes"], "gt_classes": targets["gt_classes"]}
    losses = nnx.eval_shape(
        lambda h: h(features, proposals, valid, sizes, boxes_only, key=jax.random.key(0), train=True), heads
    )
    assert set(losses) == {f"{n}_stage{k}" for n in ("loss_cls", "loss_box_reg") for k in range(3)}
    assert all(v.shape == () for v in losses.values())
    dets = nnx.eval_shape(lambda h: h(features, proposals, valid, sizes, train=False), heads)
    assert set(dets) == {"boxes", "scores", "classes", "valid"} and dets["boxes"].shape == (2, 100, 4)


def test_config_and_input_errors_name_the_fix():
    with pytest.raises(ValueError, match="class_agnostic_bbox_reg"):
        rh.RoIHeadsConfig(
            num_classes=2,
            iou_thresholds=(0.5, 0.6),
            bbox_reg_weights=((1, 1, 1, 1),) * 2,
            stage_loss_weights=(1, 1),
        )
    with pytest.raises(ValueError, match="one entry per stage"):
        rh.cascade_config(2, stage_loss_weights=(1.0, 0.5))
    with pytest.raises(ValueError, match="cascade_config"):
        rh.CascadeROIHeads(8, rh.RoIHeadsConfig(num_classes=2), rngs=nnx.Rngs(0))
    heads = rh.StandardROIHeads(
        CHANNELS, rh.RoIHeadsConfig(num_classes=NUM_CLASSES, **TINY), rngs=nnx.Rngs(0)
    )
    features, proposals, valid, sizes, targets = _tiny_inputs()
    with pytest.raises(ValueError, match="key"):
        heads(features, proposals, valid, sizes, targets, train=True)
    with pytest.raises(KeyError, match="gt_masks"):
        heads(
            features,
            proposals,
            valid,
            sizes,
            {"gt_boxes": targets["gt_boxes"], "gt_classes": targets["gt_classes"]},
            key=jax.random.key(0),
            train=True,
        )
    with pytest.raises(KeyError, match="p5"):
        heads({k: v for k, v in features.items() if k != "p5"}, proposals, valid, sizes, train=False)


# ------------------------------------------------------------------ reference: torch replicas of the heads


def _torch_ln_channels_first(torch, x, weight, bias, eps=1e-6):
    """detectron2 `LayerNorm` (layers/batch_norm.py): normalise over channels of an NCHW map."""
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    return weight[:, None, None] * ((x - u) / torch.sqrt(s + eps)) + bias[:, None, None]


def _torch_conv_norm_relu(torch, x, module):
    w = torch.from_numpy(np.asarray(module.kernel[...])).permute(3, 2, 0, 1)
    x = torch.nn.functional.conv2d(x, w, padding=1)
    scale, shift = (torch.from_numpy(np.asarray(v[...])) for v in (module.norm.scale, module.norm.bias))
    return torch.relu(_torch_ln_channels_first(torch, x, scale, shift))


def _randomise(module, seed):
    """Natural-scale random values for every parameter (the zero biases / unit LN scales hide bugs)."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(
        module,
        jax.tree.unflatten(
            treedef,
            [
                jax.random.normal(k, p.shape) / math.sqrt(max(np.prod(p.shape[:-1]), 1)) + (p.ndim == 1) * 1.0
                for k, p in zip(keys, leaves)
            ],
        ),
    )


@pytest.mark.reference
def test_box_and_mask_heads_match_torch_replicas(reference):
    torch, _ = reference
    box_head = rh.BoxHead(8, pooled_size=7, num_convs=2, conv_dim=8, fc_dims=(16, 12), rngs=nnx.Rngs(0))
    mask_head = rh.MaskHead(8, 3, num_convs=2, conv_dim=8, rngs=nnx.Rngs(1))
    _randomise(box_head, 2)
    _randomise(mask_head, 3)
    x = np.random.default_rng(0).normal(size=(5, 7, 7, 8)).astype(np.float32)
    xm = np.random.default_rng(1).normal(size=(5, 14, 14, 8)).astype(np.float32)

    with torch.no_grad():
        t = torch.from_numpy(x).permute(0, 3, 1, 2)
        for k in (1, 2):
            t = _torch_conv_norm_relu(torch, t, getattr(box_head, f"conv{k}"))
        t = torch.flatten(t, 1)  # NCHW flatten, as detectron2's FastRCNNConvFCHead
        for k in (1, 2):
            fc = getattr(box_head, f"fc{k}")
            t = torch.relu(
                t @ torch.from_numpy(np.asarray(fc.kernel[...])) + torch.from_numpy(np.asarray(fc.bias[...]))
            )
        box_expected = t.numpy()

        t = torch.from_numpy(xm).permute(0, 3, 1, 2)
        for k in (1, 2):
            t = _torch_conv_norm_relu(torch, t, getattr(mask_head, f"mask_fcn{k}"))
        deconv = torch.nn.ConvTranspose2d(8, 8, kernel_size=2, stride=2, padding=0)
        deconv.weight.copy_(torch.from_numpy(np.asarray(mask_head.deconv.kernel[...])).permute(2, 3, 0, 1))
        deconv.bias.copy_(torch.from_numpy(np.asarray(mask_head.deconv.bias[...])))
        t = torch.relu(deconv(t))
        pw = torch.from_numpy(np.asarray(mask_head.predictor.kernel[...])).permute(3, 2, 0, 1)
        t = torch.nn.functional.conv2d(t, pw, torch.from_numpy(np.asarray(mask_head.predictor.bias[...])))
        mask_expected = t.permute(0, 2, 3, 1).numpy()

    apply = nnx.jit(lambda module, inputs: module(inputs))
    np.testing.assert_allclose(apply(box_head, jnp.asarray(x)), box_expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(apply(mask_head, jnp.asarray(xm)), mask_expected, rtol=1e-4, atol=1e-5)


@pytest.mark.reference
def test_mask_targets_match_torchvision_roi_align(reference):
    torch, _ = reference
    import torchvision

    rng = np.random.default_rng(0)
    masks = np.zeros((2, 3, IMAGE, IMAGE), np.uint8)
    for b in range(2):
        for g in range(3):
            x1, y1 = rng.integers(0, 40, 2)
            masks[b, g, y1 : y1 + rng.integers(5, 24), x1 : x1 + rng.integers(5, 24)] = 1
    xy = rng.uniform(-4, 40, (2, 6, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(3, 30, (2, 6, 2))], -1).astype(np.float32)
    gt_index = rng.integers(0, 3, (2, 6))
    got = rh.mask_targets(jnp.asarray(masks), jnp.asarray(gt_index), jnp.asarray(boxes), 28)
    bitmaps = torch.from_numpy(masks.reshape(6, 1, IMAGE, IMAGE).astype(np.float32))
    rois = torch.cat(
        [
            torch.from_numpy((np.arange(2)[:, None] * 3 + gt_index).reshape(-1, 1).astype(np.float32)),
            torch.from_numpy(boxes.reshape(-1, 4)),
        ],
        1,
    )
    crops = torchvision.ops.roi_align(bitmaps, rois, 28, 1.0, sampling_ratio=0, aligned=True)
    # Compare away from the 0.5 decision boundary, where float rounding may legitimately differ.
    crops = crops[:, 0].numpy().reshape(2, 6, 28, 28)
    clear = np.abs(crops - 0.5) > 1e-4
    np.testing.assert_array_equal(np.asarray(got)[clear], (crops >= 0.5)[clear])
