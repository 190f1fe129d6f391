"""Region proposal network (detectron2 `StandardRPNHead` + `RPN`, `modeling/proposal_generator/`).

- `RPNHead`: a shared stack of 3x3 convs + ReLU (`conv_dims`; standard FPN one conv, ViTDet's
  `mask_rcnn_vitdet.py` two, `conv_dims=[-1, -1]`, with no normalisation in the RPN head: only the box and
  mask heads get LN there), then 1x1 convs to A objectness logits and 4A deltas per location; every conv
  initialised normal(std 0.01), bias 0. The same weights run on every level. Outputs are flattened in
  (y, x, anchor) order, the order of `AnchorGenerator`'s anchors.
- `label_and_sample_anchors` + `rpn_losses`: `StandardRPNHead.losses` / `RPN.losses` with fixed shapes.
- `rpn_proposals`: `find_top_rpn_proposals` with fixed shapes: per level top-k pre-NMS, decode, clip,
  drop empty boxes, NMS per level, top-k post-NMS per image, padded with `valid=False`.
- `RPN`: the module that ties them together for a feature dict {"p2": NHWC, ...}.

Per-level NMS is one `bob_jax.ops.batched_nms` over the concatenated per-level candidates with the level
id as the class (detectron2's formulation); `tests/detection/test_rpn.py` checks it against separate
per-level `nms` runs merged by score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bob_jax import ops
from bob_jax.detection.anchors import AnchorGenerator
from bob_jax.detection.box_coder import BoxCoder, giou_loss, smooth_l1_loss
from bob_jax.detection.layers import normal_init
from bob_jax.detection.matcher import Matcher, sample_labels

_INIT = {"kernel_init": normal_init(0.01), "bias_init": nnx.initializers.zeros_init()}


def _conv(in_ch: int, out_ch: int, kernel_size: int, rngs: nnx.Rngs) -> nnx.Conv:
    pad = kernel_size // 2
    return nnx.Conv(
        in_ch, out_ch, (kernel_size, kernel_size), padding=((pad, pad), (pad, pad)), rngs=rngs, **_INIT
    )


class RPNConvStack(nnx.Module):
    """detectron2's `nn.Sequential` of `conv0`, `conv1`, ... (3x3 conv + ReLU each) when conv_dims has > 1 entry."""

    def __init__(self, channels: Sequence[int], *, rngs: nnx.Rngs):
        self.num_convs = len(channels) - 1
        for k in range(self.num_convs):
            setattr(self, f"conv{k}", _conv(channels[k], channels[k + 1], 3, rngs))

    def __call__(self, x):
        for k in range(self.num_convs):
            x = jax.nn.relu(getattr(self, f"conv{k}")(x))
        return x


class RPNHead(nnx.Module):
    """detectron2 `StandardRPNHead(in_channels, num_anchors, box_dim=4, conv_dims)`; -1 in conv_dims keeps
    the input width. Parameter names follow detectron2: `conv` (one conv) or `conv.conv{k}`,
    `objectness_logits`, `anchor_deltas`."""

    def __init__(
        self, in_channels: int, num_anchors: int, *, conv_dims: Sequence[int] = (-1,), box_dim: int = 4, rngs
    ):
        if not conv_dims:
            raise ValueError(
                "conv_dims needs at least one entry (-1 keeps in_channels), e.g. (-1,) or (-1, -1)"
            )
        channels = [in_channels]
        for dim in conv_dims:
            channels.append(channels[-1] if dim == -1 else dim)
            if channels[-1] <= 0:
                raise ValueError(f"conv_dims entries must be positive or -1, got {tuple(conv_dims)}")
        self.box_dim = box_dim
        if len(conv_dims) == 1:
            self.conv = _conv(channels[0], channels[1], 3, rngs)
        else:
            self.conv = RPNConvStack(channels, rngs=rngs)
        self.objectness_logits = _conv(channels[-1], num_anchors, 1, rngs)
        self.anchor_deltas = _conv(channels[-1], num_anchors * box_dim, 1, rngs)

    def __call__(self, features: Sequence[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
        """features: per level [B, H_i, W_i, C] -> (logits [B, H_i*W_i*A], deltas [B, H_i*W_i*A, 4]) per level."""
        logits, deltas = [], []
        for x in features:
            t = self.conv(x)
            if isinstance(self.conv, nnx.Conv):
                t = jax.nn.relu(t)
            batch = x.shape[0]
            logits.append(self.objectness_logits(t).reshape(batch, -1))
            deltas.append(self.anchor_deltas(t).reshape(batch, -1, self.box_dim))
        return logits, deltas


def label_and_sample_anchors(
    key,
    anchors,
    gt_boxes,
    gt_valid,
    *,
    matcher: Matcher,
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
):
    """Match anchors [N, 4] to ground truth [B, G, 4] (valid [B, G]) and sample the training anchors.

    Returns `gt_labels` [B, N] int32 (1 sampled positive, 0 sampled negative, -1 not used) and
    `matched_gt_boxes` [B, N, 4] (each anchor's matched ground truth; zeros where an image has none).
    """
    if gt_boxes.ndim != 3 or gt_valid.shape != gt_boxes.shape[:2]:
        raise ValueError(
            f"gt_boxes must be [B, G, 4] with gt_valid [B, G], got {gt_boxes.shape}, {gt_valid.shape}"
        )

    def one_image(key, boxes, valid):
        matched_idxs, labels = matcher(ops.box_iou(boxes, anchors), valid)
        sampled = sample_labels(key, labels, batch_size_per_image, positive_fraction, bg_label=0)
        matched = jnp.where(valid.any(), boxes[matched_idxs], 0.0)
        return jnp.where(sampled, labels, -1), matched

    keys = jax.random.split(key, gt_boxes.shape[0])
    labels, matched = jax.vmap(one_image)(keys, jax.lax.stop_gradient(gt_boxes), gt_valid)
    return labels, matched


def rpn_losses(
    anchors,
    pred_objectness_logits,
    pred_anchor_deltas,
    gt_labels,
    matched_gt_boxes,
    *,
    box_coder: BoxCoder,
    batch_size_per_image: int = 256,
    box_reg_loss_type: str = "smooth_l1",
    smooth_l1_beta: float = 0.0,
) -> dict[str, jax.Array]:
    """detectron2 `RPN.losses`: {"loss_rpn_cls", "loss_rpn_loc"}, each a sum over images / (B * batch_size_per_image).

    anchors [N, 4]; pred_objectness_logits [B, N]; pred_anchor_deltas [B, N, 4]; gt_labels [B, N] in {-1, 0, 1}
    and matched_gt_boxes [B, N, 4] from `label_and_sample_anchors`. Objectness: BCE with logits over
    labels >= 0. Box loss over positives: smooth-L1 (beta 0 = L1) on encoded deltas, or "giou" on decoded boxes.
    """
    positive = gt_labels == 1
    normaliser = batch_size_per_image * gt_labels.shape[0]
    if box_reg_loss_type == "smooth_l1":
        # Non-positive anchors can be matched to padding (zero boxes, -inf log-size deltas): zero their
        # targets so no inf reaches the masked sum or its gradient.
        gt_deltas = box_coder.encode(anchors, jnp.where(positive[..., None], matched_gt_boxes, anchors))
        per_anchor = smooth_l1_loss(pred_anchor_deltas, gt_deltas, smooth_l1_beta).sum(axis=-1)
    elif box_reg_loss_type == "giou":
        pred_boxes = box_coder.decode(pred_anchor_deltas, anchors)
        per_anchor = giou_loss(pred_boxes, jnp.where(positive[..., None], matched_gt_boxes, anchors))
    else:
        raise ValueError(f"box_reg_loss_type must be 'smooth_l1' or 'giou', got {box_reg_loss_type!r}")
    loc = jnp.where(positive, per_anchor, 0.0).sum()
    bce = optax.sigmoid_binary_cross_entropy(pred_objectness_logits, (gt_labels == 1).astype(jnp.float32))
    cls = jnp.where(gt_labels >= 0, bce, 0.0).sum()
    return {"loss_rpn_cls": cls / normaliser, "loss_rpn_loc": loc / normaliser}


def rpn_proposals(
    anchors: Sequence[jax.Array],
    pred_objectness_logits: Sequence[jax.Array],
    pred_anchor_deltas: Sequence[jax.Array],
    image_sizes,
    *,
    box_coder: BoxCoder,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_thresh: float = 0.7,
    min_box_size: float = 0.0,
):
    """detectron2 `find_top_rpn_proposals` with fixed shapes (gradients stopped).

    Per level (anchors [N_i, 4], logits [B, N_i], deltas [B, N_i, 4]): the top min(pre_nms_topk, N_i) logits,
    decoded, clipped to `image_sizes` [B, 2] (height, width), kept if finite and wider and taller than
    `min_box_size`, NMS at `nms_thresh`; then the best `post_nms_topk` per image over all levels.
    Returns `boxes` [B, post_nms_topk, 4], `scores` [B, post_nms_topk] (objectness logits, descending) and
    `valid` [B, post_nms_topk]; padded entries have zero boxes and -inf scores.
    """
    if not len(anchors) == len(pred_objectness_logits) == len(pred_anchor_deltas):
        raise ValueError("anchors, pred_objectness_logits and pred_anchor_deltas need one entry per level")
    image_sizes = jnp.asarray(image_sizes)
    all_boxes, all_scores, level_ids = [], [], []
    for level, (level_anchors, logits, deltas) in enumerate(
        zip(anchors, pred_objectness_logits, pred_anchor_deltas)
    ):
        logits, deltas = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(deltas)
        k = min(pre_nms_topk, logits.shape[1])
        scores, idx = jax.lax.top_k(logits, k)
        top_deltas = jnp.take_along_axis(deltas, idx[..., None], axis=1)
        all_boxes.append(box_coder.decode(top_deltas, jnp.asarray(level_anchors)[idx]))
        all_scores.append(scores)
        level_ids.append(jnp.full((k,), level, jnp.int32))
    boxes = ops.clip_boxes(jnp.concatenate(all_boxes, axis=1), image_sizes[:, None, :])
    scores, level_ids = jnp.concatenate(all_scores, axis=1), jnp.concatenate(level_ids)
    # detectron2 raises on non-finite proposals in training and drops them in inference; fixed shapes
    # can only drop them. `Boxes.nonempty(min_box_size)` keeps sides strictly larger than the threshold.
    candidate = (
        jnp.isfinite(boxes).all(axis=-1)
        & jnp.isfinite(scores)
        & (boxes[..., 2] - boxes[..., 0] > min_box_size)
        & (boxes[..., 3] - boxes[..., 1] > min_box_size)
    )
    keep = jax.vmap(lambda b, s, v: ops.batched_nms(b, s, level_ids, nms_thresh, post_nms_topk, valid=v))(
        boxes, scores, candidate
    )
    valid = keep >= 0
    safe = jnp.maximum(keep, 0)
    boxes = jnp.where(valid[..., None], jnp.take_along_axis(boxes, safe[..., None], axis=1), 0.0)
    scores = jnp.where(valid, jnp.take_along_axis(scores, safe, axis=1), -jnp.inf)
    return boxes, scores, valid


@dataclasses.dataclass(frozen=True)
class RPNConfig:
    """detectron2 `RPN` settings; defaults are `mask_rcnn_fpn.py` / `mask_rcnn_vitdet.py` except `conv_dims`
    (FPN (-1,), ViTDet (-1, -1)). (train, test) pairs for the top-k counts."""

    in_features: tuple[str, ...] = ("p2", "p3", "p4", "p5", "p6")
    conv_dims: tuple[int, ...] = (-1,)
    anchor_generator: AnchorGenerator = dataclasses.field(default_factory=AnchorGenerator)
    matcher: Matcher = dataclasses.field(
        default_factory=lambda: Matcher((0.3, 0.7), (0, -1, 1), allow_low_quality_matches=True)
    )
    box_coder: BoxCoder = dataclasses.field(default_factory=BoxCoder)
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    pre_nms_topk: tuple[int, int] = (2000, 1000)
    post_nms_topk: tuple[int, int] = (1000, 1000)
    nms_thresh: float = 0.7
    min_box_size: float = 0.0
    box_reg_loss_type: str = "smooth_l1"
    smooth_l1_beta: float = 0.0


class RPN(nnx.Module):
    """detectron2 `RPN`: head on the `in_features` maps, anchors, losses (training) and proposals."""

    def __init__(self, in_channels: int, config: RPNConfig = RPNConfig(), *, rngs: nnx.Rngs):
        self.config = config
        self.head = RPNHead(
            in_channels, config.anchor_generator.num_anchors, conv_dims=config.conv_dims, rngs=rngs
        )

    def __call__(
        self,
        features: Mapping[str, jax.Array],
        image_sizes,
        *,
        training: bool,
        gt_boxes=None,
        gt_valid=None,
        key=None,
    ):
        """features {name: [B, H, W, C]}, image_sizes [B, 2] -> (proposals, losses).

        proposals: {"boxes" [B, P, 4], "scores" [B, P], "valid" [B, P]}, P = post_nms_topk (train or test).
        losses: `rpn_losses`' dict when training (needs gt_boxes [B, G, 4], gt_valid [B, G], key), else {}.
        """
        cfg = self.config
        missing = [name for name in cfg.in_features if name not in features]
        if missing:
            raise KeyError(
                f"RPN needs feature maps {cfg.in_features}; missing {missing} (got {sorted(features)})"
            )
        if training and (gt_boxes is None or gt_valid is None or key is None):
            raise ValueError("RPN in training needs gt_boxes, gt_valid and a key for anchor sampling")
        maps = [features[name] for name in cfg.in_features]
        anchors = [jnp.asarray(a) for a in cfg.anchor_generator([m.shape[1:3] for m in maps])]
        logits, deltas = self.head(maps)
        losses = {}
        if training:
            all_anchors = jnp.concatenate(anchors, axis=0)
            gt_labels, matched = label_and_sample_anchors(
                key,
                all_anchors,
                gt_boxes,
                gt_valid,
                matcher=cfg.matcher,
                batch_size_per_image=cfg.batch_size_per_image,
                positive_fraction=cfg.positive_fraction,
            )
            losses = rpn_losses(
                all_anchors,
                jnp.concatenate(logits, axis=1),
                jnp.concatenate(deltas, axis=1),
                gt_labels,
                matched,
                box_coder=cfg.box_coder,
                batch_size_per_image=cfg.batch_size_per_image,
                box_reg_loss_type=cfg.box_reg_loss_type,
                smooth_l1_beta=cfg.smooth_l1_beta,
            )
        phase = 0 if training else 1
        boxes, scores, valid = rpn_proposals(
            anchors,
            logits,
            deltas,
            image_sizes,
            box_coder=cfg.box_coder,
            pre_nms_topk=cfg.pre_nms_topk[phase],
            post_nms_topk=cfg.post_nms_topk[phase],
            nms_thresh=cfg.nms_thresh,
            min_box_size=cfg.min_box_size,
        )
        return {"boxes": boxes, "scores": scores, "valid": valid}, losses
