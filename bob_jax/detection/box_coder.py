"""Box regression parametrisation and the box regression losses of detectron2.

`BoxCoder` is detectron2's `Box2BoxTransform` (`detectron2/modeling/box_regression.py`): boxes are
(x1, y1, x2, y2) with width x2 - x1 (no +1) and centre x1 + 0.5 * width; deltas are
(wx * dx / w, wy * dy / h, ww * log(w' / w), wh * log(h' / h)); decoding clamps dw, dh from above at
`scale_clamp` so exp() cannot overflow. Losses are elementwise (no reduction) so callers can mask
padded entries with `jnp.where` and choose their own normaliser, as detectron2's heads do:
`smooth_l1_loss` is fvcore's (plain L1 when beta < 1e-5) and `giou_loss` is fvcore's
`giou_loss` (eps 1e-7), the per-pair loss detectron2 applies to matched (prediction, target) pairs.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

# detectron2's _DEFAULT_SCALE_CLAMP: a box can grow at most 1000/16 times its anchor per side.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _centre_size(boxes):
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


@dataclasses.dataclass(frozen=True)
class BoxCoder:
    """detectron2 `Box2BoxTransform(weights, scale_clamp)`; RPN uses weights (1, 1, 1, 1), the box head
    (10, 10, 5, 5), the cascade stages (20, 20, 10, 10) and (30, 30, 15, 15)."""

    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    scale_clamp: float = DEFAULT_SCALE_CLAMP

    def __post_init__(self):
        if len(self.weights) != 4:
            raise ValueError(f"BoxCoder weights must be (wx, wy, ww, wh), got {self.weights!r}")
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))

    def encode(self, src_boxes, target_boxes):
        """Deltas [..., 4] that turn `src_boxes` [..., 4] into `target_boxes` [..., 4] (`get_deltas`).

        Source boxes must have positive width and height (anchors, proposals); a degenerate target gives
        -inf size deltas, so mask such entries before using them in a loss.
        """
        wx, wy, ww, wh = self.weights
        sx, sy, sw, sh = _centre_size(src_boxes)
        tx, ty, tw, th = _centre_size(target_boxes)
        return jnp.stack(
            [wx * (tx - sx) / sw, wy * (ty - sy) / sh, ww * jnp.log(tw / sw), wh * jnp.log(th / sh)], axis=-1
        )

    def decode(self, deltas, boxes):
        """Apply `deltas` [..., k*4] to `boxes` [..., 4] -> [..., k*4] (`apply_deltas`; k > 1 for
        class-specific regression, every class's deltas applied to the same box). Computed in float32."""
        deltas = jnp.asarray(deltas, jnp.float32)
        if deltas.shape[-1] % 4:
            raise ValueError(f"deltas' last axis must be a multiple of 4 (k*4), got shape {deltas.shape}")
        k = deltas.shape[-1] // 4
        deltas = deltas.reshape(*deltas.shape[:-1], k, 4)
        cx, cy, w, h = (v[..., None] for v in _centre_size(jnp.asarray(boxes, jnp.float32)))
        wx, wy, ww, wh = self.weights
        dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
        dw = jnp.minimum(deltas[..., 2] / ww, self.scale_clamp)
        dh = jnp.minimum(deltas[..., 3] / wh, self.scale_clamp)
        pred_cx, pred_cy = dx * w + cx, dy * h + cy
        pred_w, pred_h = jnp.exp(dw) * w, jnp.exp(dh) * h
        out = jnp.stack(
            [pred_cx - 0.5 * pred_w, pred_cy - 0.5 * pred_h, pred_cx + 0.5 * pred_w, pred_cy + 0.5 * pred_h],
            axis=-1,
        )
        return out.reshape(*out.shape[:-2], k * 4)


def smooth_l1_loss(pred, target, beta: float):
    """Elementwise smooth-L1 (fvcore): 0.5 x^2 / beta below beta, |x| - 0.5 beta above; |x| for beta < 1e-5
    (detectron2's RPN default beta = 0 is plain L1)."""
    diff = jnp.abs(pred - target)
    if beta < 1e-5:
        return diff
    return jnp.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def giou_loss(boxes, target_boxes, eps: float = 1e-7):
    """1 - GIoU of each pair (boxes[..., i], target_boxes[..., i]) -> [...] (fvcore `giou_loss`, no reduction).

    Elementwise on matched pairs: the pairwise [N, M] `bob_jax.ops.generalized_box_iou` would cost N^2
    for N matched pairs; the eps terms are fvcore's, so the values equal detectron2's loss.
    """
    x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
    gx1, gy1, gx2, gy2 = (target_boxes[..., i] for i in range(4))
    inter_w = jnp.maximum(jnp.minimum(x2, gx2) - jnp.maximum(x1, gx1), 0.0)
    inter_h = jnp.maximum(jnp.minimum(y2, gy2) - jnp.maximum(y1, gy1), 0.0)
    inter = inter_w * inter_h
    union = (x2 - x1) * (y2 - y1) + (gx2 - gx1) * (gy2 - gy1) - inter
    iou = inter / (union + eps)
    hull = (jnp.maximum(x2, gx2) - jnp.minimum(x1, gx1)) * (jnp.maximum(y2, gy2) - jnp.minimum(y1, gy1))
    return 1.0 - (iou - (hull - union) / (hull + eps))
