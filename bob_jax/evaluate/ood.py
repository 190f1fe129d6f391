"""ImageNet-A / ImageNet-R evaluation with 1000-way classifiers restricted to the sets' 200 classes.

Follows BoB's `classification/validate.py` (hsouri/bob-ood-classification @ 6c4908a1): the 1000 logits
are cut to the valid classes with a boolean mask, `output[:, valid_labels]`, which keeps them in
ascending class-index order; top-1 / top-5 are then taken over those 200 logits against the 200-class
target (the target's position in the ascending list). A prediction outside the 200 classes is therefore
impossible, unlike plain 1000-way argmax.

Class lists: `bob_jax.data.imagenet_ood_classes.valid_class_indices('imagenet_a' | 'imagenet_r')`;
1000-space labels (tensorflow-datasets) -> 200-space with `to_masked_labels`.

`masked_logits` indexes with an integer array, which works on numpy and jax arrays alike (usable inside a
jitted eval step); the accuracy functions return Python floats computed in numpy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["masked_logits", "masked_top1", "masked_topk_accuracy"]


def _check_mask_indices(mask_indices, num_classes: int) -> np.ndarray:
    idx = np.asarray(mask_indices)
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"mask_indices must be a non-empty 1-D integer array, got {idx.dtype} {idx.shape}")
    if np.any(np.diff(idx) <= 0):
        raise ValueError(
            "mask_indices must be strictly ascending: the original masks with a boolean vector, so the "
            "200-class label is the position in ascending order. Pass np.unique(mask_indices)"
        )
    if idx[0] < 0 or idx[-1] >= num_classes:
        raise ValueError(
            f"mask_indices must lie in [0, {num_classes}) for {num_classes} logits, got "
            f"[{idx[0]}, {idx[-1]}]"
        )
    return idx.astype(np.int64)


def masked_logits(logits, mask_indices):
    """`logits[..., mask_indices]`: [B, 1000] -> [B, len(mask_indices)] in ascending class order."""
    idx = _check_mask_indices(mask_indices, logits.shape[-1])
    return logits[..., idx]


def masked_topk_accuracy(logits_1000, labels_200, mask_indices, k: int = 1, *, valid=None) -> float:
    """Fraction of examples whose 200-class label is among the top-k of the masked logits.

    `labels_200`: positions in the ascending `mask_indices` (the original ImageFolder targets).
    `valid`: optional bool [B] selecting real examples (padded eval batches). Ties between equal logits
    go to the lower class index (stable sort), like `argmax`.
    """
    logits = np.asarray(logits_1000)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [batch, classes], got shape {logits.shape}")
    sub = masked_logits(logits, mask_indices)
    labels = np.asarray(labels_200)
    if labels.shape != (logits.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be integer [batch]={logits.shape[0]}, got {labels.dtype} {labels.shape}"
        )
    if not 1 <= k <= sub.shape[1]:
        raise ValueError(f"k must lie in [1, {sub.shape[1]}], got {k}")
    keep = np.ones(labels.shape, bool) if valid is None else np.asarray(valid, bool)
    if keep.shape != labels.shape:
        raise ValueError(f"valid must have shape {labels.shape}, got {keep.shape}")
    if np.any((labels[keep] < 0) | (labels[keep] >= sub.shape[1])):
        raise ValueError(
            f"labels must be 200-class positions in [0, {sub.shape[1]}); got range "
            f"[{labels[keep].min()}, {labels[keep].max()}]. 1000-class labels? convert them with "
            "bob_jax.data.imagenet_ood_classes.to_masked_labels"
        )
    n = int(keep.sum())
    if n == 0:
        raise ValueError("no valid examples to score")
    sub, labels = sub[keep], labels[keep]
    if k == 1:
        hit = np.argmax(sub, axis=1) == labels
    else:
        # A label is in the top-k when fewer than k logits beat it (strictly, or equal with a lower index).
        target = np.take_along_axis(sub, labels[:, None], axis=1)
        cols = np.arange(sub.shape[1])[None, :]
        ahead = (sub > target) | ((sub == target) & (cols < labels[:, None]))
        hit = ahead.sum(axis=1) < k
    return float(np.mean(hit))


def masked_top1(logits_1000, labels_200, mask_indices, *, valid=None) -> float:
    """Top-1 accuracy of argmax over the masked logits against 200-class labels (BoB's A/R metric)."""
    return masked_topk_accuracy(logits_1000, labels_200, mask_indices, 1, valid=valid)
