"""R-CNN RoI heads with fixed shapes: Mask R-CNN (`StandardROIHeads`) and Cascade (`CascadeROIHeads`).

detectron2 semantics (`modeling/roi_heads/{roi_heads,fast_rcnn,box_head,mask_head,cascade_rcnn}.py`,
configs `mask_rcnn_vitdet.py` and `cascade_mask_rcnn_vitdet_b_100ep.py`):

- Training RoIs (`sample_rois`): ground-truth boxes appended to the proposals, matched at IoU 0.5
  (no low-quality matches), `batch_size_per_image` (512) sampled with at most 25 % positives ->
  fixed [B, R] RoIs with `valid`, class targets (background = C, padding = -1) and matched GT boxes.
  Positives are placed first, so the mask head trains on the first int(R * positive_fraction) RoIs.
- `BoxHead` ("4conv1fc": 4 x (3x3 conv without bias + LN + ReLU), flatten, FC 1024 + ReLU) and
  `FastRCNNPredictor` (C+1 logits; 4C class-specific or 4 class-agnostic deltas). Losses: softmax
  cross-entropy averaged over the sampled RoIs, box regression on foreground RoIs summed and divided
  by the number of sampled RoIs: smooth-L1 on encoded deltas (beta 0 = L1) or GIoU on decoded boxes
  (the original BoB/mmdet configs: GIoU, weight 10, decoded boxes).
- `MaskHead`: 4 x (3x3 conv + LN + ReLU), ConvT 2x2/2 + ReLU, 1x1 predictor of C class-specific 28x28
  mask logits; loss: per-pixel BCE of the ground-truth class's channel, mean over pixels and positives.
  Mask targets (`mask_targets`) crop the matched ground-truth bitmap with RoIAlign (aligned=True,
  adaptive sampling, spatial scale 1) and threshold at 0.5, as detectron2's `BitMasks.crop_and_resize`
  and mmdet's `BitmapMasks.crop_and_resize` do; detectron2's COCO default rasterises the polygons
  inside each box instead, which differs only along the object boundary.
- Cascade: 3 stages (IoU 0.5 / 0.6 / 0.7, delta weights (10,10,5,5) / (20,20,10,10) / (30,30,15,15)),
  class-agnostic regression. Stage k > 0 takes the previous stage's decoded boxes, gradient stopped and
  clipped to the image; during training empty boxes are dropped (`valid` False) and the boxes are
  relabelled at the stage's IoU (detectron2, `cascade_sampling="relabel"`) or re-sampled like mmdet
  (`"resample"`: ground truth appended again, 512 drawn at 25 % positives; mmdet first drops the refined
  copies of the ground-truth RoIs, here they stay as extra candidates). The pooled features' gradient
  is scaled by 1 / num_stages (detectron2's `_ScaleGradient`; mmdet has none: `scale_feature_grad`);
  stage loss weights default to detectron2's (1, 1, 1), mmdet's are (1, 0.5, 0.25). Test time: class
  probabilities averaged over stages, boxes from the last stage. The single mask head (detectron2)
  trains on the first stage's samples and predicts on the final detections; mmdet trains one mask head
  per stage and averages their sigmoid masks at test time, which is not implemented.

Only "LN" (detectron2's channels-first LayerNorm, eps 1e-6: a LayerNorm over the channel axis of the
NHWC map) or no normalisation is offered in the conv heads; the BoB configs of hierarchical backbones
use SyncBN there, which needs batch statistics across RoIs and devices.

Initialisation is detectron2's: convs (and the deconv) `c2_msra_fill` (He normal, fan-out, bias 0),
FCs `c2_xavier_fill` (uniform +-sqrt(3 / fan_in), bias 0), class scores N(0, 0.01), box deltas
N(0, 0.001), mask predictor N(0, 0.001), biases 0.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bob_jax import ops
from bob_jax.detection import postprocess
from bob_jax.detection.box_coder import BoxCoder, giou_loss, smooth_l1_loss
from bob_jax.detection.layers import ConvTranspose2x2, msra_fill, normal_init, xavier_fill
from bob_jax.detection.matcher import Matcher, sample_labels
from bob_jax.models import layers

NORMS = ("LN", None)
CASCADE_SAMPLING = ("relabel", "resample")
BOX_LOSSES = ("smooth_l1", "giou")
# A positive-size placeholder box for entries whose regression targets are masked out: encoding it
# against itself gives finite zeros, so no inf/NaN reaches a masked sum or its gradient.
_UNIT_BOX = np.array([0.0, 0.0, 1.0, 1.0], np.float32)


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


class ConvNormReLU(nnx.Module):
    """detectron2 `Conv2d(c_in, c_out, 3, padding=1, bias=norm is None, norm, activation=ReLU)`, NHWC."""

    def __init__(self, in_channels: int, out_channels: int, *, norm: str | None, rngs: nnx.Rngs):
        self.kernel = nnx.Param(msra_fill(rngs.params(), (3, 3, in_channels, out_channels)))
        self.bias = nnx.Param(jnp.zeros((out_channels,))) if norm is None else None
        # detectron2's "LN" normalises each position over channels with eps 1e-6.
        self.norm = layers.layer_norm(out_channels, eps=1e-6, rngs=rngs) if norm == "LN" else None

    def __call__(self, x):
        x = jax.lax.conv_general_dilated(
            x,
            self.kernel[...].astype(x.dtype),
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.bias is not None:
            x = x + self.bias[...].astype(x.dtype)
        if self.norm is not None:
            x = self.norm(x)
        return jax.nn.relu(x)


class BoxHead(nnx.Module):
    """detectron2 `FastRCNNConvFCHead`: `conv1..N` (3x3, norm, ReLU) then `fc1..M` (+ ReLU).

    Input [N, S, S, C] pooled RoI features; output [N, fc_dims[-1]]. The map is flattened in torch's
    (C, H, W) order so `fc1` holds detectron2's weight rows unpermuted.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        pooled_size: int = 7,
        num_convs: int = 4,
        conv_dim: int = 256,
        fc_dims: tuple[int, ...] = (1024,),
        norm: str | None = "LN",
        rngs: nnx.Rngs,
    ):
        if norm not in NORMS:
            raise ValueError(f"box head norm must be one of {NORMS}, got {norm!r}")
        if num_convs + len(fc_dims) == 0:
            raise ValueError("a box head needs at least one conv or fc layer (num_convs or fc_dims)")
        self.num_convs, self.num_fcs = num_convs, len(fc_dims)
        channels = in_channels
        for k in range(num_convs):
            setattr(self, f"conv{k + 1}", ConvNormReLU(channels, conv_dim, norm=norm, rngs=rngs))
            channels = conv_dim
        dim = channels * pooled_size * pooled_size
        for k, out in enumerate(fc_dims):
            fc = nnx.Linear(
                dim, out, kernel_init=xavier_fill, bias_init=nnx.initializers.zeros_init(), rngs=rngs
            )
            setattr(self, f"fc{k + 1}", fc)
            dim = out
        self.output_dim = dim

    def __call__(self, x):
        for k in range(self.num_convs):
            x = getattr(self, f"conv{k + 1}")(x)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        for k in range(self.num_fcs):
            x = jax.nn.relu(getattr(self, f"fc{k + 1}")(x))
        return x


class FastRCNNPredictor(nnx.Module):
    """detectron2 `FastRCNNOutputLayers` layers: `cls_score` (C+1, background last) and `bbox_pred`
    (4C class-specific, or 4 class-agnostic as the cascade stages use)."""

    def __init__(self, in_dim: int, num_classes: int, *, class_agnostic: bool, rngs: nnx.Rngs):
        zeros = nnx.initializers.zeros_init()
        self.cls_score = nnx.Linear(
            in_dim, num_classes + 1, kernel_init=normal_init(0.01), bias_init=zeros, rngs=rngs
        )
        num_deltas = 4 if class_agnostic else 4 * num_classes
        self.bbox_pred = nnx.Linear(
            in_dim, num_deltas, kernel_init=normal_init(0.001), bias_init=zeros, rngs=rngs
        )

    def __call__(self, x):
        return self.cls_score(x), self.bbox_pred(x)


class MaskHead(nnx.Module):
    """detectron2 `MaskRCNNConvUpsampleHead`: `mask_fcn1..N` (3x3, norm, ReLU), `deconv` (ConvT 2x2/2 +
    ReLU), `predictor` (1x1 conv to one logit map per class). [K, 14, 14, C] -> [K, 28, 28, classes]."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        num_convs: int = 4,
        conv_dim: int = 256,
        norm: str | None = "LN",
        rngs: nnx.Rngs,
    ):
        if norm not in NORMS:
            raise ValueError(f"mask head norm must be one of {NORMS}, got {norm!r}")
        self.num_convs = num_convs
        channels = in_channels
        for k in range(num_convs):
            setattr(self, f"mask_fcn{k + 1}", ConvNormReLU(channels, conv_dim, norm=norm, rngs=rngs))
            channels = conv_dim
        self.deconv = ConvTranspose2x2(channels, conv_dim, init="msra", rngs=rngs)
        self.predictor = nnx.Conv(
            conv_dim,
            num_classes,
            (1, 1),
            padding="VALID",
            kernel_init=normal_init(0.001),
            bias_init=nnx.initializers.zeros_init(),
            rngs=rngs,
        )

    def __call__(self, x):
        for k in range(self.num_convs):
            x = getattr(self, f"mask_fcn{k + 1}")(x)
        return self.predictor(jax.nn.relu(self.deconv(x)))


# --------------------------------------------------------------------------------------------------
# Training targets
# --------------------------------------------------------------------------------------------------


class RoiTargets(NamedTuple):
    """Fixed-size RoIs of a batch with their training targets (all arrays [B, R, ...])."""

    boxes: jax.Array  # [B, R, 4] RoI boxes (no gradient)
    valid: jax.Array  # [B, R] bool, False for padding slots
    classes: jax.Array  # [B, R] int32: 0..C-1 foreground, C background, -1 padding
    gt_boxes: jax.Array  # [B, R, 4] matched ground-truth box (meaningful for foreground only)
    gt_index: jax.Array  # [B, R] int32 matched ground-truth slot (meaningful for foreground only)

    def foreground(self, num_classes: int) -> jax.Array:
        return self.valid & (self.classes >= 0) & (self.classes < num_classes)


def _label_one(boxes, valid, gt_boxes, gt_classes, matcher, num_classes):
    """Match one image's boxes [N, 4] to its ground truth [G, 4] -> (classes [N], gt_index [N])."""
    gt_valid = gt_classes >= 0
    gt_index, labels = matcher(ops.box_iou(gt_boxes, boxes), gt_valid)
    classes = jnp.where(labels == 1, gt_classes[gt_index], num_classes)
    return jnp.where(valid, classes, -1).astype(jnp.int32), gt_index


def _gather_targets(boxes, valid, classes, gt_index, gt_boxes) -> RoiTargets:
    matched = jnp.take_along_axis(gt_boxes, gt_index[..., None], axis=-2)
    return RoiTargets(boxes, valid, classes, matched, gt_index)


def label_rois(boxes, valid, gt_boxes, gt_classes, *, num_classes: int, iou_threshold: float) -> RoiTargets:
    """Label every RoI [B, R, 4] (no sampling) by its best ground truth: foreground at IoU >= threshold.

    This is detectron2's `CascadeROIHeads._match_and_label_boxes` for stages after the first.
    """
    matcher = Matcher((iou_threshold,), (0, 1), allow_low_quality_matches=False)
    boxes = jax.lax.stop_gradient(boxes)
    fn = functools.partial(_label_one, matcher=matcher, num_classes=num_classes)
    classes, gt_index = jax.vmap(fn)(boxes, valid, gt_boxes, gt_classes)
    return _gather_targets(boxes, valid, classes, gt_index, gt_boxes)


def sample_rois(
    key,
    proposals,
    proposal_valid,
    gt_boxes,
    gt_classes,
    *,
    num_classes: int,
    iou_threshold: float = 0.5,
    batch_size_per_image: int = 512,
    positive_fraction: float = 0.25,
    append_gt: bool = True,
) -> RoiTargets:
    """detectron2 `label_and_sample_proposals` with fixed shapes.

    proposals [B, P, 4] with proposal_valid [B, P]; gt_boxes [B, G, 4], gt_classes [B, G] (-1 padding).
    With `append_gt` the valid ground-truth boxes join the candidates. Every candidate is matched at
    `iou_threshold`; `sample_labels` draws at most int(R * positive_fraction) positives and fills up
    with negatives, R = `batch_size_per_image`. Returns R slots per image, positives first, then
    negatives, then padding (`valid` False) when fewer than R candidates exist.
    """
    if proposals.ndim != 3 or proposal_valid.shape != proposals.shape[:2]:
        raise ValueError(
            f"proposals must be [B, P, 4] with proposal_valid [B, P]; got "
            f"{proposals.shape} and {proposal_valid.shape}"
        )
    if gt_boxes.ndim != 3 or gt_classes.shape != gt_boxes.shape[:2]:
        raise ValueError(
            f"gt_boxes must be [B, G, 4] with gt_classes [B, G]; got {gt_boxes.shape} and {gt_classes.shape}"
        )
    matcher = Matcher((iou_threshold,), (0, 1), allow_low_quality_matches=False)
    num_samples = batch_size_per_image
    candidates = jax.lax.stop_gradient(proposals)
    candidate_valid = proposal_valid.astype(bool)
    if append_gt:
        candidates = jnp.concatenate([candidates, gt_boxes.astype(candidates.dtype)], axis=1)
        candidate_valid = jnp.concatenate([candidate_valid, gt_classes >= 0], axis=1)
    if candidates.shape[1] < num_samples:  # fewer candidates than slots: pad with invalid boxes
        pad = num_samples - candidates.shape[1]
        candidates = jnp.pad(candidates, ((0, 0), (0, pad), (0, 0)))
        candidate_valid = jnp.pad(candidate_valid, ((0, 0), (0, pad)))

    def one_image(key, boxes, valid, gt_boxes, gt_classes):
        classes, gt_index = _label_one(boxes, valid, gt_boxes, gt_classes, matcher, num_classes)
        labels = jnp.where(classes < 0, -1, jnp.where(classes == num_classes, 0, 1))
        chosen = sample_labels(key, labels, num_samples, positive_fraction, bg_label=0)
        rank = 2 * chosen.astype(jnp.int32) + (labels == 1)  # sampled positives, sampled negatives, rest
        order = jnp.argsort(-rank, stable=True)[:num_samples]
        valid = chosen[order]
        return boxes[order], valid, jnp.where(valid, classes[order], -1), gt_index[order]

    keys = jax.random.split(key, candidates.shape[0])
    boxes, valid, classes, gt_index = jax.vmap(one_image)(
        keys, candidates, candidate_valid, gt_boxes, gt_classes
    )
    return _gather_targets(boxes, valid, classes, gt_index, gt_boxes)


def mask_targets(gt_masks, gt_index, boxes, mask_size: int = 28, *, chunk_size: int = 32) -> jax.Array:
    """Binary mask targets [B, K, m, m]: each box's matched GT bitmap cropped by RoIAlign, >= 0.5.

    gt_masks [B, G, S, S] full-image bitmaps (any dtype, 0/1); gt_index [B, K] matched GT slots; boxes
    [B, K, 4] in input pixels. RoIAlign with aligned=True, spatial scale 1 and the adaptive sampling
    count, exact for every box inside the frame (the sampling cap is set above S / m), as detectron2's /
    mmdet's bitmap-mask `crop_and_resize`.

    Each RoI crops only its own instance's bitmap, `chunk_size` RoIs at a time: `ops.roi_align` over all
    B * G bitmaps at once would contract every RoI with every bitmap (its one-hot image selection), and
    a [B, S, S, G] stack would pool all G instances per RoI.
    """
    b, _, height, width = gt_masks.shape
    k = gt_index.shape[1]
    cap = -(-max(height, width) // mask_size) + 1

    def crop(args):
        image, slot, box = args
        bitmap = gt_masks[image, slot].astype(jnp.float32)[None, :, :, None]
        out = ops.roi_align(
            bitmap,
            box[None],
            jnp.zeros((1,), jnp.int32),
            mask_size,
            1.0,
            sampling_ratio=0,
            aligned=True,
            max_sampling_ratio=cap,
        )
        return out[0, :, :, 0]

    images = jnp.repeat(jnp.arange(b, dtype=jnp.int32), k)
    boxes = jax.lax.stop_gradient(boxes).reshape(-1, 4).astype(jnp.float32)
    crops = jax.lax.map(crop, (images, gt_index.reshape(-1), boxes), batch_size=min(chunk_size, b * k))
    return (crops >= 0.5).astype(jnp.float32).reshape(b, k, mask_size, mask_size)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def fast_rcnn_losses(
    logits,
    deltas,
    targets: RoiTargets,
    *,
    num_classes: int,
    box_coder: BoxCoder,
    box_loss: str = "smooth_l1",
    smooth_l1_beta: float = 0.0,
    box_loss_weight: float = 1.0,
) -> dict[str, jax.Array]:
    """detectron2 `FastRCNNOutputLayers.losses` over the valid RoIs of a batch.

    logits [B, R, C+1]; deltas [B, R, 4C] or [B, R, 4]. `loss_cls`: softmax cross-entropy averaged over
    valid RoIs. `loss_box_reg`: on foreground RoIs (the ground-truth class's deltas when
    class-specific), summed and divided by the number of valid RoIs, times `box_loss_weight`.
    """
    if box_loss not in BOX_LOSSES:
        raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
    valid = targets.valid
    count = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets.classes, 0))
    loss_cls = jnp.where(valid, ce, 0.0).sum() / count

    fg = targets.foreground(num_classes)
    deltas = deltas.reshape(*deltas.shape[:-1], -1, 4)
    if deltas.shape[-2] > 1:  # class-specific: the ground-truth class's four deltas
        cls = jnp.clip(targets.classes, 0, num_classes - 1)
        deltas = jnp.take_along_axis(deltas, cls[..., None, None], axis=-2)
    deltas = deltas[..., 0, :]
    rois = jnp.where(fg[..., None], targets.boxes, _UNIT_BOX)
    gt = jnp.where(fg[..., None], targets.gt_boxes, _UNIT_BOX)
    if box_loss == "smooth_l1":
        per_roi = smooth_l1_loss(deltas, box_coder.encode(rois, gt), smooth_l1_beta).sum(-1)
    else:
        per_roi = giou_loss(box_coder.decode(deltas, rois), gt)
    loss_box = jnp.where(fg, per_roi, 0.0).sum() / count
    return {"loss_cls": loss_cls, "loss_box_reg": box_loss_weight * loss_box}


def mask_loss(mask_logits, classes, foreground, targets) -> jax.Array:
    """detectron2 `mask_rcnn_loss`: BCE of the ground-truth class's logits [B, K, m, m] against the
    targets, averaged over the pixels of all foreground RoIs (0 without any)."""
    channel = jnp.clip(classes, 0, mask_logits.shape[-1] - 1)  # background/padding: any channel, masked
    picked = jnp.take_along_axis(mask_logits, channel[..., None, None, None], axis=-1)[..., 0]
    bce = optax.sigmoid_binary_cross_entropy(picked, targets).mean(axis=(-2, -1))
    return jnp.where(foreground, bce, 0.0).sum() / jnp.maximum(foreground.sum(), 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_gradient(x, scale: float):
    """Identity forward; multiplies the incoming gradient by `scale` (detectron2 `_ScaleGradient`)."""
    return x


def _scale_gradient_fwd(x, scale):
    return x, None


def _scale_gradient_bwd(scale, _, g):
    return (jax.tree.map(lambda t: t * scale, g),)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


# --------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RoIHeadsConfig:
    """RoI-head settings. Defaults: Mask R-CNN of detectron2's `mask_rcnn_vitdet.py` (one stage,
    class-specific regression); `cascade_config` gives `cascade_mask_rcnn_vitdet_b_100ep.py`.

    One entry per stage in `iou_thresholds`, `bbox_reg_weights` and `stage_loss_weights`.
    """

    num_classes: int
    in_features: tuple[str, ...] = ("p2", "p3", "p4", "p5")
    box_pooler_size: int = 7
    mask_pooler_size: int = 14
    pooler_sampling_ratio: int = 0
    # box head "4conv1fc" with LN
    num_convs: int = 4
    conv_dim: int = 256
    fc_dims: tuple[int, ...] = (1024,)
    norm: str | None = "LN"
    # training RoIs
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    proposal_append_gt: bool = True
    # stages
    iou_thresholds: tuple[float, ...] = (0.5,)
    bbox_reg_weights: tuple[tuple[float, float, float, float], ...] = ((10.0, 10.0, 5.0, 5.0),)
    class_agnostic_bbox_reg: bool = False
    stage_loss_weights: tuple[float, ...] = (1.0,)
    cascade_sampling: str = "relabel"
    scale_feature_grad: bool = True
    # losses
    box_loss: str = "smooth_l1"
    smooth_l1_beta: float = 0.0
    box_loss_weight: float = 1.0
    # mask head
    mask_on: bool = True
    mask_num_convs: int = 4
    mask_conv_dim: int = 256
    # test time
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_image: int = 100
    max_candidates: int | None = None

    def __post_init__(self):
        stages = len(self.iou_thresholds)
        if stages < 1 or len(self.bbox_reg_weights) != stages or len(self.stage_loss_weights) != stages:
            raise ValueError(
                f"iou_thresholds {self.iou_thresholds}, bbox_reg_weights {self.bbox_reg_weights} and "
                f"stage_loss_weights {self.stage_loss_weights} need one entry per stage (at least one)"
            )
        if stages > 1 and not self.class_agnostic_bbox_reg:
            raise ValueError("cascade stages refine one box per RoI: set class_agnostic_bbox_reg=True")
        if self.cascade_sampling not in CASCADE_SAMPLING:
            raise ValueError(
                f"cascade_sampling must be one of {CASCADE_SAMPLING}, got {self.cascade_sampling!r}"
            )
        if self.box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {self.box_loss!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 foreground classes, got {self.num_classes}")

    @property
    def num_stages(self) -> int:
        return len(self.iou_thresholds)

    @property
    def num_mask_rois(self) -> int:
        """Training RoIs given to the mask head: the sampler's positive capacity (positives come first)."""
        return max(int(self.batch_size_per_image * self.positive_fraction), 1)


def cascade_config(num_classes: int, **overrides) -> RoIHeadsConfig:
    """detectron2's Cascade (Mask) R-CNN ViTDet stages; mmdet's weighting is
    `stage_loss_weights=(1, 0.5, 0.25), scale_feature_grad=False, cascade_sampling="resample"`."""
    settings = {
        "iou_thresholds": (0.5, 0.6, 0.7),
        "bbox_reg_weights": ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0)),
        "class_agnostic_bbox_reg": True,
        "stage_loss_weights": (1.0, 1.0, 1.0),
        **overrides,
    }
    return RoIHeadsConfig(num_classes=num_classes, **settings)


def _check_targets(targets, batch: int, mask_on: bool):
    if targets is None:
        raise ValueError(
            "training needs targets={'gt_boxes' [B, G, 4], 'gt_classes' [B, G], 'gt_masks' [B, G, S, S]}"
        )
    required = ("gt_boxes", "gt_classes") + (("gt_masks",) if mask_on else ())
    missing = [k for k in required if k not in targets]
    if missing:
        raise KeyError(f"targets lack {missing}; got {sorted(targets)} (gt_masks is needed when mask_on)")
    boxes, classes = targets["gt_boxes"], targets["gt_classes"]
    if boxes.ndim != 3 or boxes.shape[0] != batch or boxes.shape[-1] != 4 or classes.shape != boxes.shape[:2]:
        raise ValueError(
            f"gt_boxes must be [B={batch}, G, 4] and gt_classes [B, G]; got {boxes.shape}, {classes.shape}"
        )
    if mask_on and targets["gt_masks"].shape[:2] != boxes.shape[:2]:
        raise ValueError(
            f"gt_masks must be [B, G, S, S] like gt_boxes' [B, G]; got {targets['gt_masks'].shape}"
        )


class _CascadeCapableROIHeads(nnx.Module):
    """Box stages (pooling, box head, predictor) plus an optional mask head; see the module docstring."""

    def __init__(self, in_channels: int, config: RoIHeadsConfig, *, rngs: nnx.Rngs):
        self.config = config
        cfg = config

        def stage_modules():
            head = BoxHead(
                in_channels,
                pooled_size=cfg.box_pooler_size,
                num_convs=cfg.num_convs,
                conv_dim=cfg.conv_dim,
                fc_dims=cfg.fc_dims,
                norm=cfg.norm,
                rngs=rngs,
            )
            predictor = FastRCNNPredictor(
                head.output_dim, cfg.num_classes, class_agnostic=cfg.class_agnostic_bbox_reg, rngs=rngs
            )
            return head, predictor

        if cfg.num_stages == 1:  # detectron2 names: box_head.*, box_predictor.*
            self.box_head, self.box_predictor = stage_modules()
        else:  # box_head.{k}.*, box_predictor.{k}.*
            heads, predictors = zip(*(stage_modules() for _ in range(cfg.num_stages)))
            self.box_head, self.box_predictor = nnx.List(heads), nnx.List(predictors)
        self.mask_head = (
            MaskHead(
                in_channels,
                cfg.num_classes,
                num_convs=cfg.mask_num_convs,
                conv_dim=cfg.mask_conv_dim,
                norm=cfg.norm,
                rngs=rngs,
            )
            if cfg.mask_on
            else None
        )

    def _stage(self, k: int):
        if self.config.num_stages == 1:
            return self.box_head, self.box_predictor
        return self.box_head[k], self.box_predictor[k]

    def _pool(self, features, boxes, size):
        return ops.multilevel_roi_align(
            features,
            boxes,
            size,
            levels=self.config.in_features,
            sampling_ratio=self.config.pooler_sampling_ratio,
            aligned=True,
        )

    def _run_stage(self, k, features, boxes):
        """Box head + predictor of stage k on RoIs [B, R, 4] -> logits [B, R, C+1], deltas [B, R, 4 or 4C]."""
        b, r = boxes.shape[:2]
        pooled = self._pool(features, boxes, self.config.box_pooler_size)
        if self.config.num_stages > 1 and self.config.scale_feature_grad:
            pooled = scale_gradient(pooled, 1.0 / self.config.num_stages)
        head, predictor = self._stage(k)
        logits, deltas = predictor(head(pooled.reshape(b * r, *pooled.shape[2:])))
        return logits.reshape(b, r, -1), deltas.reshape(b, r, -1)

    def _refine(self, k, deltas, boxes, image_sizes):
        """Stage k's class-agnostic boxes as the next stage's RoIs: decoded, no gradient, clipped."""
        coder = BoxCoder(self.config.bbox_reg_weights[k])
        refined = ops.clip_boxes(coder.decode(jax.lax.stop_gradient(deltas), boxes), image_sizes[:, None, :])
        return jax.lax.stop_gradient(refined)

    def __call__(
        self,
        features: Mapping[str, jax.Array],
        proposals,
        proposal_valid,
        image_sizes,
        targets: Mapping[str, jax.Array] | None = None,
        *,
        key=None,
        train: bool,
    ) -> dict[str, jax.Array]:
        """features {"p2": [B, H, W, C], ...}; proposals [B, P, 4] with proposal_valid [B, P];
        image_sizes [B, 2] (height, width).

        train=True: needs `targets` {"gt_boxes" [B, G, 4], "gt_classes" [B, G] (-1 padding), "gt_masks"
        [B, G, S, S]} and a `key` for RoI sampling; returns the losses ("loss_cls", "loss_box_reg" and
        "loss_mask"; cascade: "loss_cls_stage{k}", "loss_box_reg_stage{k}", "loss_mask").
        train=False: returns detections {"boxes" [B, D, 4], "scores", "classes", "valid" [B, D], and
        with a mask head "masks" [B, D, 28, 28] probabilities}.
        """
        missing = [name for name in self.config.in_features if name not in features]
        if missing:
            raise KeyError(
                f"RoI heads pool from {self.config.in_features}; missing {missing} (got {sorted(features)})"
            )
        if proposals.ndim != 3 or proposal_valid.shape != proposals.shape[:2]:
            raise ValueError(
                f"proposals must be [B, P, 4] with proposal_valid [B, P]; got {proposals.shape} and "
                f"{proposal_valid.shape}"
            )
        image_sizes = jnp.asarray(image_sizes)
        if train:
            if key is None:
                raise ValueError("training samples RoIs at random: pass key=jax.random.key(...)")
            _check_targets(targets, proposals.shape[0], self.config.mask_on)
            return self._losses(features, proposals, proposal_valid, image_sizes, targets, key)
        return self._detect(features, proposals, proposal_valid, image_sizes)

    def _losses(self, features, proposals, proposal_valid, image_sizes, targets, key):
        cfg = self.config
        gt_boxes, gt_classes = targets["gt_boxes"], targets["gt_classes"]
        sample = functools.partial(
            sample_rois,
            gt_boxes=gt_boxes,
            gt_classes=gt_classes,
            num_classes=cfg.num_classes,
            batch_size_per_image=cfg.batch_size_per_image,
            positive_fraction=cfg.positive_fraction,
            append_gt=cfg.proposal_append_gt,
        )
        first = rois = sample(key, proposals, proposal_valid, iou_threshold=cfg.iou_thresholds[0])
        losses, deltas = {}, None  # each stage's deltas make the next stage's RoIs
        for k in range(cfg.num_stages):
            if k > 0:
                boxes = self._refine(k - 1, deltas, rois.boxes, image_sizes)
                nonempty = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
                valid = rois.valid & nonempty
                if cfg.cascade_sampling == "resample":
                    rois = sample(
                        jax.random.fold_in(key, k), boxes, valid, iou_threshold=cfg.iou_thresholds[k]
                    )
                else:
                    rois = label_rois(
                        boxes,
                        valid,
                        gt_boxes,
                        gt_classes,
                        num_classes=cfg.num_classes,
                        iou_threshold=cfg.iou_thresholds[k],
                    )
            logits, deltas = self._run_stage(k, features, rois.boxes)
            stage = fast_rcnn_losses(
                logits,
                deltas,
                rois,
                num_classes=cfg.num_classes,
                box_coder=BoxCoder(cfg.bbox_reg_weights[k]),
                box_loss=cfg.box_loss,
                smooth_l1_beta=cfg.smooth_l1_beta,
                box_loss_weight=cfg.box_loss_weight,
            )
            suffix = "" if cfg.num_stages == 1 else f"_stage{k}"
            losses.update({name + suffix: cfg.stage_loss_weights[k] * v for name, v in stage.items()})
        if cfg.mask_on:
            losses["loss_mask"] = self._mask_loss(features, first, targets["gt_masks"])
        return losses

    def _mask_loss(self, features, rois: RoiTargets, gt_masks):
        m = min(self.config.num_mask_rois, rois.boxes.shape[1])
        boxes, classes = rois.boxes[:, :m], rois.classes[:, :m]
        fg = rois.foreground(self.config.num_classes)[:, :m]
        logits = self._mask_logits(features, boxes)
        targets = mask_targets(gt_masks, rois.gt_index[:, :m], boxes, logits.shape[2])
        return mask_loss(logits, classes, fg, targets)

    def _mask_logits(self, features, boxes):
        b, k = boxes.shape[:2]
        pooled = self._pool(features, boxes, self.config.mask_pooler_size)
        logits = self.mask_head(pooled.reshape(b * k, *pooled.shape[2:]))
        return logits.reshape(b, k, *logits.shape[1:])

    def _detect(self, features, proposals, proposal_valid, image_sizes):
        cfg = self.config
        boxes = jax.lax.stop_gradient(proposals)
        probs, deltas = 0.0, None
        for k in range(cfg.num_stages):
            if k > 0:  # detectron2 keeps empty boxes at test time so the stages' scores stay aligned
                boxes = self._refine(k - 1, deltas, boxes, image_sizes)
            logits, deltas = self._run_stage(k, features, boxes)
            probs = probs + jax.nn.softmax(logits, axis=-1)
        probs = probs / cfg.num_stages
        decoded = BoxCoder(cfg.bbox_reg_weights[-1]).decode(deltas, boxes)
        decoded = decoded.reshape(*decoded.shape[:-1], -1, 4)
        dets = postprocess.detect(
            probs,
            decoded,
            proposal_valid,
            image_sizes,
            score_thresh=cfg.score_thresh,
            nms_thresh=cfg.nms_thresh,
            max_detections=cfg.detections_per_image,
            max_candidates=cfg.max_candidates,
        )
        if cfg.mask_on:
            logits = self._mask_logits(features, jax.lax.stop_gradient(dets["boxes"]))
            dets["masks"] = postprocess.mask_probabilities(logits, dets["classes"])
        return dets


class StandardROIHeads(_CascadeCapableROIHeads):
    """Mask R-CNN RoI heads (one stage, class-specific regression by default)."""

    def __init__(self, in_channels: int, config: RoIHeadsConfig, *, rngs: nnx.Rngs):
        if config.num_stages != 1:
            raise ValueError(f"StandardROIHeads has one stage; got {config.num_stages}: use CascadeROIHeads")
        super().__init__(in_channels, config, rngs=rngs)


class CascadeROIHeads(_CascadeCapableROIHeads):
    """Cascade (Mask) R-CNN RoI heads: several stages of increasing IoU (see `cascade_config`)."""

    def __init__(self, in_channels: int, config: RoIHeadsConfig, *, rngs: nnx.Rngs):
        if config.num_stages < 2:
            raise ValueError(
                f"CascadeROIHeads needs at least two stages, got {config.num_stages}; "
                "build it with cascade_config(num_classes) or use StandardROIHeads"
            )
        super().__init__(in_channels, config, rngs=rngs)
