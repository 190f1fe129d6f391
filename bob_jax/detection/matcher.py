"""IoU matching and fixed-size label sampling (detectron2 `Matcher` and `subsample_labels`).

`Matcher` assigns every prediction (anchor or proposal) to its highest-IoU ground truth and labels it by
the IoU interval it falls in; with `allow_low_quality_matches`, for every ground truth the predictions
with its maximum IoU (ties included) become positive, keeping their own argmax match (detectron2 and
Detectron behave the same way). Ground truth is padded to G per image: invalid rows can neither be
matched nor create low-quality matches, and an image without valid ground truth labels everything
`labels[0]` (background), like detectron2's empty-ground-truth branch. As in detectron2, a valid ground
truth whose best IoU is 0 makes every prediction with IoU 0 to it positive: drop empty boxes from the
ground truth (detectron2's `filter_empty_instances`) before matching.

`sample_labels` is `subsample_labels` with fixed shapes: a random subset of at most
`int(num_samples * positive_fraction)` positives, negatives filling the rest, returned as a mask.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Matcher:
    """detectron2 `Matcher(thresholds, labels, allow_low_quality_matches)`.

    RPN: thresholds (0.3, 0.7), labels (0, -1, 1), low-quality matches on (IoU < 0.3 -> 0 background,
    [0.3, 0.7) -> -1 ignored, >= 0.7 -> 1 foreground). RoI heads: thresholds (0.5,), labels (0, 1).
    """

    thresholds: tuple[float, ...]
    labels: tuple[int, ...]
    allow_low_quality_matches: bool = False

    def __post_init__(self):
        thresholds = tuple(float(t) for t in self.thresholds)
        if list(thresholds) != sorted(thresholds):
            raise ValueError(f"Matcher thresholds must be increasing, got {thresholds}")
        if len(self.labels) != len(thresholds) + 1:
            raise ValueError(
                f"Matcher needs one label per IoU interval: {len(thresholds)} thresholds make "
                f"{len(thresholds) + 1} intervals but {len(self.labels)} labels were given"
            )
        if any(label not in (-1, 0, 1) for label in self.labels):
            raise ValueError(
                f"Matcher labels must be -1 (ignore), 0 (background) or 1 (foreground): {self.labels}"
            )
        object.__setattr__(self, "thresholds", thresholds)
        object.__setattr__(self, "labels", tuple(int(v) for v in self.labels))

    def __call__(self, quality, gt_valid):
        """Match predictions to ground truth.

        quality: [..., G, N] match quality (IoU) of every ground truth with every prediction.
        gt_valid: [..., G] bool, False for padding rows.
        Returns `matched_idxs` [..., N] int32 (index of the matched ground truth; 0 where nothing is valid)
        and `match_labels` [..., N] int32 in `self.labels`.
        """
        if quality.shape[:-1] != gt_valid.shape:
            raise ValueError(
                f"quality {quality.shape} must be [..., G, N] with gt_valid {gt_valid.shape} = [..., G]"
            )
        if quality.shape[-2] == 0:  # no ground-truth slots at all: detectron2's empty branch
            shape = quality.shape[:-2] + quality.shape[-1:]
            return jnp.zeros(shape, jnp.int32), jnp.full(shape, self.labels[0], jnp.int32)
        # IoU is >= 0, so -1 keeps padded rows out of the argmax whenever one valid row exists.
        quality = jnp.where(gt_valid[..., None], quality, -1.0)
        matched_vals = quality.max(axis=-2)
        matched_idxs = quality.argmax(axis=-2).astype(jnp.int32)
        bounds = (-jnp.inf, *self.thresholds, jnp.inf)
        match_labels = jnp.ones(matched_vals.shape, jnp.int32)
        for label, low, high in zip(self.labels, bounds[:-1], bounds[1:]):
            in_interval = (matched_vals >= low) & (matched_vals < high)
            match_labels = jnp.where(in_interval, label, match_labels)
        if self.allow_low_quality_matches:
            best_per_gt = quality.max(axis=-1, keepdims=True)
            is_best = (quality == best_per_gt) & gt_valid[..., None]
            match_labels = jnp.where(is_best.any(axis=-2), 1, match_labels)
        any_valid = gt_valid.any(axis=-1, keepdims=True)
        match_labels = jnp.where(any_valid, match_labels, self.labels[0])
        matched_idxs = jnp.where(any_valid, matched_idxs, 0)
        return matched_idxs, match_labels


def sample_labels(key, labels, num_samples: int, positive_fraction: float, bg_label: int = 0):
    """Fixed-shape detectron2 `subsample_labels` for one image: a bool mask [N] of the sampled entries.

    labels: [N] int; -1 ignored, `bg_label` negative, anything else positive.
    Samples a uniformly random subset of min(#positives, int(num_samples * positive_fraction))
    positives and min(#negatives, num_samples - #sampled positives) negatives. Positives of the result
    are `mask & (labels != -1) & (labels != bg_label)`. Same key -> same mask. Batch with `jax.vmap`.
    """
    if labels.ndim != 1:
        raise ValueError(
            f"sample_labels takes one image's labels [N], got shape {labels.shape}; use jax.vmap"
        )
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    positive = (labels != -1) & (labels != bg_label)
    negative = labels == bg_label
    num_pos = jnp.minimum(positive.sum(), int(num_samples * positive_fraction))
    num_neg = jnp.minimum(negative.sum(), num_samples - num_pos)
    # A random permutation, then a stable sort by group (positives, negatives, ignored): each group's
    # members appear in uniformly random order, so a member's rank within its group picks a random subset.
    group = jnp.where(positive, 0, jnp.where(negative, 1, 2))
    perm = jax.random.permutation(key, labels.shape[0])
    order = perm[jnp.argsort(group[perm], stable=True)]
    rank = jnp.zeros(labels.shape[0], jnp.int32).at[order].set(jnp.arange(labels.shape[0], dtype=jnp.int32))
    rank_in_group = rank - jnp.where(negative, positive.sum(), 0)
    return (positive & (rank_in_group < num_pos)) | (negative & (rank_in_group < num_neg))
