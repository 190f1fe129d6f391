"""Detector assembly: config checks, input normalisation, trunk/neck choice per backbone kind, shapes of
the losses and detections, and one-step smoke tests of Cascade Mask R-CNN and a plain-ViT Mask R-CNN
through the real train step (finite losses and gradients, frozen trunk untouched)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bob_jax import backbones
from bob_jax.detection.model import Detector, DetectorConfig, is_plain_vit, num_params, set_train_mode

LITE0 = "tf_efficientnet_lite0.offline"
VIT = "vit_small_patch16_224.augreg_in1k"
SIZE = 64


pytestmark = pytest.mark.usefixtures("fast_compile")


TINY = {  # a narrow detector at 64 px: the same code paths as the full-size one
    "backbone": LITE0, "weights": "pretrained", "head": "mask_rcnn", "num_classes": 3, "image_size": SIZE,
    "neck_channels": 32, "box_head_convs": 1, "box_head_conv_dim": 32, "box_head_fc_dim": 64,
    "mask_head_convs": 1, "mask_head_conv_dim": 16, "rpn_pre_nms_topk": (64, 64), "rpn_post_nms_topk": (32, 32),
    "rpn_batch_size_per_image": 64, "roi_batch_size_per_image": 16, "detections_per_image": 10,
    "drop_path_rate": 0.0,
}


def tiny(**overrides) -> DetectorConfig:
    return DetectorConfig(**{**TINY, **overrides})


def batch(b=2, size=SIZE, g=4, seed=0):
    """Random images with two boxes/masks per image and padding in the second image."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
    sizes = np.array([[size, size]] + [[size - 16, size - 8]] * (b - 1), np.int32)
    boxes = np.zeros((b, g, 4), np.float32)
    boxes[:, 0] = [4, 6, 30, 40]
    boxes[:, 1] = [20, 10, 50, 30]
    classes = np.full((b, g), -1, np.int32)
    classes[:, :2] = [0, 2]
    masks = np.zeros((b, g, size, size), np.uint8)
    masks[:, 0, 6:40, 4:30] = 1
    masks[:, 1, 10:30, 20:50] = 1
    return {"image": images, "image_size": sizes, "gt_boxes": boxes, "gt_classes": classes, "gt_masks": masks}


@pytest.fixture(scope="module")
def lite0_detector():
    return Detector(tiny())


# -------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"head": "retinanet"}, "head="),
        ({"neck": "fpn"}, "neck="),
        ({"image_size": 100}, "multiple of 32"),
        ({"num_classes": 0}, "num_classes"),
        ({"anchor_sizes": (32, 64)}, "anchor_sizes"),
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
    ],
)
def test_config_errors_name_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_config_maps_head_kinds_to_roi_head_settings():
    assert not tiny().cascade and tiny().mask_on
    cascade = tiny(head="cascade_mask_rcnn").roi_heads_config()
    assert cascade.num_stages == 3 and cascade.mask_on and cascade.iou_thresholds == (0.5, 0.6, 0.7)
    box_only = tiny(head="cascade_rcnn").roi_heads_config()
    assert box_only.num_stages == 3 and not box_only.mask_on
    mmdet = tiny(head="cascade_mask_rcnn", cascade_style="mmdet").roi_heads_config()
    assert mmdet.stage_loss_weights == (1.0, 0.5, 0.25) and mmdet.cascade_sampling == "resample"
    assert not mmdet.scale_feature_grad
    assert tiny(box_head_fcs=2).roi_heads_config().fc_dims == (64, 64)
    assert tiny().rpn_config(plain_vit=True).conv_dims == (-1, -1)
    assert tiny().rpn_config(plain_vit=False).conv_dims == (-1,)


# -------------------------------------------------------------------------------------------------- assembly


def _feature_shapes(det):
    data = batch()
    return jax.eval_shape(lambda: det.features(jnp.asarray(data["image"]), jnp.asarray(data["image_size"])))


def test_normalize_uses_the_backbones_statistics_and_zeroes_the_padding(lite0_detector):
    data = batch()
    got = np.asarray(lite0_detector.normalize(jnp.asarray(data["image"]), jnp.asarray(data["image_size"])))
    pre = lite0_detector.preprocess
    want = (data["image"] / 255.0 - np.asarray(pre.mean)) / np.asarray(pre.std)
    for i, (h, w) in enumerate(data["image_size"]):
        want[i, h:], want[i, :, w:] = 0.0, 0.0
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert pre.mean == (0.5, 0.5, 0.5)  # Lite0's own statistics, not ImageNet's


def test_hierarchical_trunk_keeps_its_pretrained_weights_and_feeds_an_fpn(lite0_detector):
    det = lite0_detector
    assert not det.plain_vit and type(det.neck).__name__ == "FPN"
    reference = backbones.create(LITE0, weights="pretrained", num_classes=0)
    want = jax.tree.leaves(nnx.state(reference, nnx.Param))
    got = jax.tree.leaves(nnx.state(det.trunk, nnx.Param))
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert det.weights_id == reference.weights_id and det.name == LITE0
    feats = _feature_shapes(det)
    assert {k: v.shape for k, v in feats.items()} == {
        f"p{k}": (2, SIZE // 2**k, SIZE // 2**k, 32) for k in range(2, 7)
    }
    assert num_params(det) == num_params(det.trunk) + num_params(det.neck) + num_params(det.rpn) + num_params(
        det.roi_heads
    )


@pytest.mark.parametrize("neck", ["vitdet", "bob"])
def test_plain_vits_get_a_vitdet_trunk_and_simple_pyramid(neck):
    det = Detector(tiny(backbone=VIT, weights=None, neck=neck))
    assert det.plain_vit and type(det.trunk).__name__ == "ViTDetBackbone"
    assert det.trunk.cfg.variant == neck and det.neck.variant == neck
    assert det.trunk.cfg.img_size == (SIZE, SIZE)
    vit = backbones.create(VIT, weights=None, num_classes=0)
    assert is_plain_vit(vit)
    np.testing.assert_array_equal(det.trunk.blocks[3].mlp.fc1.kernel[...], vit.blocks[3].mlp.fc1.kernel[...])
    feats = _feature_shapes(det)
    assert [v.shape[1] for v in feats.values()] == [16, 8, 4, 2, 1]


def test_detect_returns_fixed_shapes_with_a_valid_mask(lite0_detector):
    det = lite0_detector
    det.eval()
    graphdef, state = nnx.split(det)
    data = batch()
    out = jax.jit(lambda s, x, sz: nnx.merge(graphdef, s).detect(x, sz))(state, data["image"], data["image_size"])
    d = det.config.detections_per_image
    assert out["boxes"].shape == (2, d, 4) and out["masks"].shape == (2, d, 28, 28)
    valid = np.asarray(out["valid"])
    classes, scores = np.asarray(out["classes"]), np.asarray(out["scores"])
    assert np.all(classes[~valid] == -1) and np.all((classes[valid] >= 0) & (classes[valid] < 3))
    assert np.all(scores[valid] > det.config.roi_heads_config().score_thresh)
    boxes = np.asarray(out["boxes"])
    for i, (h, w) in enumerate(data["image_size"]):  # clipped to each image's valid region
        assert np.all(boxes[i, :, [0, 2]] <= w) and np.all(boxes[i, :, [1, 3]] <= h)
    masks = np.asarray(out["masks"])
    assert np.all((masks >= 0) & (masks <= 1))


# -------------------------------------------------------------------------------------------------- one step


def _one_step(det, protocol, seed=0):
    from bob_jax import parallel
    from bob_jax.detection import train as train_lib

    cfg = train_lib.TrainConfig(protocol=protocol, steps=10, batch_size=2, lr=1e-3, warmup_steps=0)
    if protocol == "finetune":
        set_train_mode(det)
    else:
        for module in (det.neck, det.rpn, det.roi_heads):
            set_train_mode(module)
    graphdef, params, frozen, rest = train_lib.split_model(det, protocol)
    det.eval()
    tx = train_lib.make_optimizer(det, params, cfg)
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    step = train_lib.make_train_step(graphdef, tx, mesh)
    before = jax.tree.map(np.asarray, (params, frozen, rest))
    opt_state = tx.init(params)
    data = {k: jnp.asarray(v) for k, v in batch(seed=seed).items()}
    params, rest, _, losses = step(jax.tree.map(jnp.array, params), frozen, jax.tree.map(jnp.array, rest),
                                   opt_state, data, jax.random.key(seed))
    return before, (params, frozen, rest), {k: float(v) for k, v in losses.items()}


def test_cascade_mask_rcnn_one_step_is_finite_and_leaves_a_frozen_trunk_alone():
    det = Detector(tiny(head="cascade_mask_rcnn"))
    (params0, frozen0, rest0), (params1, frozen1, rest1), losses = _one_step(det, "frozen")
    expected = {"loss_rpn_cls", "loss_rpn_loc", "loss_mask", "total"} | {
        f"{name}_stage{k}" for name in ("loss_cls", "loss_box_reg") for k in range(3)
    }
    assert set(losses) == expected and all(np.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] > 0 and losses["loss_cls_stage0"] > 0
    # the trainable part is the neck and heads only; every one of its parameters moved (AdamW with lr 1e-3)
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(params0)}
    assert paths and not any(p.startswith("trunk") for p in paths)
    assert any(p.startswith("roi_heads.box_head.2.") for p in paths)
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params0), jax.tree.leaves(params1))]
    assert all(moved)
    # the trunk (frozen parameters and BatchNorm statistics) is unchanged
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(frozen1)))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(rest0), jax.tree.leaves(rest1)))


def test_plain_vit_mask_rcnn_one_step_finetunes_the_trunk():
    det = Detector(tiny(backbone=VIT, weights=None, drop_path_rate=0.1))
    (params0, frozen0, _), (params1, _, _), losses = _one_step(det, "finetune")
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask", "total"}
    assert all(np.isfinite(v) for v in losses.values())
    assert np.isclose(losses["total"], sum(v for k, v in losses.items() if k != "total"), rtol=1e-5)
    assert not jax.tree.leaves(frozen0)  # nothing is frozen
    flat0, flat1 = _flat(params0), _flat(params1)
    trunk = [p for p in flat0 if p[0] == "trunk"]
    assert trunk and all(np.all(np.isfinite(flat1[p][...])) for p in flat1)
    moved = [p for p in trunk if not np.array_equal(flat0[p][...], flat1[p][...])]
    assert len(moved) > 0.9 * len(trunk)  # rel-pos tables and blocks train (zero-init tables too)


def test_dataclass_is_hashable_and_records_as_json():
    import json

    cfg = tiny()
    assert hash(cfg) == hash(dataclasses.replace(cfg))
    json.dumps(dataclasses.asdict(cfg))


# -------------------------------------------------------------------------------------------------- training


def _flat(state) -> dict:
    """{path tuple: value} of an nnx State (Variable wrappers removed)."""
    return {path: var.get_value() for path, var in nnx.to_flat_state(state)}


def test_lr_schedule_warms_up_linearly_then_steps_down_at_27_and_33_of_36():
    from bob_jax.detection.train import TrainConfig, lr_schedule

    cfg = TrainConfig(steps=360, lr=2e-4, warmup_steps=100, warmup_factor=0.001)
    schedule = lr_schedule(cfg)
    want = {0: 2e-4 * 0.001, 50: 2e-4 * (0.001 + 0.999 * 0.5), 100: 2e-4, 269: 2e-4, 270: 2e-5, 329: 2e-5,
            330: 2e-6, 359: 2e-6}
    for step, value in want.items():
        assert np.isclose(float(schedule(step)), value, rtol=1e-6), step


def test_finetune_lr_scales_follow_the_trunks_layer_ids_and_leave_heads_at_one(lite0_detector):
    from bob_jax.detection import train as train_lib
    from bob_jax.tasks.finetune import layer_decay_scales

    det = lite0_detector
    params = nnx.state(det, nnx.Param)
    scales = _flat(train_lib.lr_scales(det, params, 0.7))
    # the classification fine-tuning's scales (checked there against timm's param_groups_layer_decay)
    trunk = _flat(layer_decay_scales(det.trunk, 0.7))
    assert trunk and all(scales[("trunk", *path)] == value for path, value in trunk.items())
    assert min(trunk.values()) < 0.7**5  # the stem is decayed many times
    assert all(v == 1.0 for path, v in scales.items() if path[0] != "trunk")
    mask = _flat(train_lib.weight_decay_mask(params))
    assert mask[("trunk", "conv_stem", "kernel")] and not mask[("trunk", "bn1", "bias")]
    assert mask[("roi_heads", "box_predictor", "cls_score", "kernel")]
    assert not mask[("roi_heads", "box_predictor", "cls_score", "bias")]


def test_plain_vit_lr_scales_are_detectron2s_vitdet_rule():
    from bob_jax.detection import train as train_lib

    det = Detector(tiny(backbone=VIT, weights=None))
    params = nnx.state(det, nnx.Param)
    scales = _flat(train_lib.lr_scales(det, params, 0.7))
    depth = 12
    assert np.isclose(scales[("trunk", "pos_embed")], 0.7 ** (depth + 1))
    assert np.isclose(scales[("trunk", "patch_embed", "proj", "kernel")], 0.7 ** (depth + 1))
    for i in (0, 5, 11):  # get_vit_lr_decay_rate: blocks.i -> decay ** (depth - i)
        assert np.isclose(scales[("trunk", "blocks", i, "attn", "rel_pos_h")], 0.7 ** (depth - i))
    assert scales[("neck", "simfp_2", 0, "kernel")] == 1.0
    mask = _flat(train_lib.weight_decay_mask(params))
    assert not mask[("trunk", "pos_embed")] and mask[("trunk", "blocks", 0, "attn", "rel_pos_h")]


@pytest.fixture
def shapes_dir(tmp_path):
    from bob_jax.detection.synthetic import write_coco_dataset

    return write_coco_dataset(tmp_path / "data", "train", 4, seed=3, size=(48, 64))


def test_training_resumes_exactly_and_evaluates_with_pycocotools(shapes_dir, tmp_path):
    """3 steps with a checkpoint after each; the last checkpoint is deleted and the run restarted: it
    resumes at step 2 from the saved iterator state and ends bit-identical."""
    import shutil

    from bob_jax import parallel
    from bob_jax.detection.data import CocoDetection
    from bob_jax.detection.train import TrainConfig, train

    source = CocoDetection(*shapes_dir, filter_empty=True)
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-3, warmup_steps=1, checkpoint_every=1, log_every=1,
                      num_threads=1)
    workdir = tmp_path / "run"
    first = train(Detector(tiny(num_classes=5)), source, cfg, mesh=mesh, workdir=str(workdir), progress=False)
    assert first.steps == 3 and first.resumed_from == 0 and len(first.losses) == 3
    shutil.rmtree(workdir / "checkpoints" / "3")
    second = train(Detector(tiny(num_classes=5)), source, cfg, mesh=mesh, workdir=str(workdir), progress=False)
    assert second.resumed_from == 2 and second.steps == 3
    assert second.losses[-1] == first.losses[-1]
    for a, b in zip(jax.tree.leaves(first.state), jax.tree.leaves(second.state)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="different detection run"):
        train(Detector(tiny(num_classes=5)), source, dataclasses.replace(cfg, lr=2e-3), mesh=mesh,
              workdir=str(workdir), progress=False)

    metrics = second.evaluate(source, batch_size=3, mesh=mesh, num_threads=1)
    assert metrics["num_images"] == 4 and set(metrics) >= {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        assert set(metrics[iou_type]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert all(np.isnan(v) or 0.0 <= v <= 1.0 for v in metrics[iou_type].values())
