"""CheXpert-style multi-label evaluation: the five competition labels, uncertainty policy, mean AUROC.

Follows BoB's `medical_chexpert` (hsouri/bob-classification @ 19a93cde; the dataset class comes from
LibAUC, Yuan et al. ICCV 2021):

- labels (in this order): Cardiomegaly, Edema, Consolidation, Atelectasis, Pleural Effusion
  (`train_cols` of `util/dataloader_med.py:CheXpert`);
- uncertain (-1) -> 1 for Edema and Atelectasis ("U-Ones"), -> 0 for the other three ("U-Zeros"),
  blanks (not mentioned) -> 0 (`df[col].replace(-1, ...)`, `fillna(0)`);
- metric: per-label ROC AUC of the sigmoid outputs, averaged over the labels (`engine_finetune.py`
  `computeAUROC`). A label whose evaluation targets hold a single class has no AUROC: the original's
  sklearn raised (recent sklearn, 1.9 here, warns and returns NaN), the original caught that, stored 0
  and averaged the non-zero entries. Here such a label is skipped with a recorded warning (`skipped`,
  `warnings` in the result, and `warnings.warn`). Difference: the original would also drop a genuine
  AUROC of exactly 0; this module keeps it.

AUROC is computed from ranks (Mann-Whitney U with average ranks for ties), which equals sklearn's
trapezoidal `roc_auc_score` including ties. It is invariant to monotone maps, so logits and sigmoid
probabilities give the same value (up to float32 sigmoid saturation, which can create ties: prefer logits).
numpy only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CHEXPERT_CSV_OBSERVATIONS",
    "CHEXPERT_LABELS",
    "CHEXPERT_TFDS_CLASS_NAMES",
    "CHEXPERT_UNCERTAIN_TO",
    "auroc",
    "chexpert_targets",
    "chexpert_targets_from_csv_rows",
    "chexpert_targets_from_tfds",
    "mean_auroc",
]

CHEXPERT_LABELS = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")
# Value an uncertain (-1) mention becomes, per label (U-Ones for Edema/Atelectasis, U-Zeros otherwise).
CHEXPERT_UNCERTAIN_TO = {
    "Cardiomegaly": 0.0,
    "Edema": 1.0,
    "Consolidation": 0.0,
    "Atelectasis": 1.0,
    "Pleural Effusion": 0.0,
}
# The 14 observation columns of CheXpert's train.csv / valid.csv, in file order (after Path, Sex, Age,
# Frontal/Lateral, AP/PA). tensorflow-datasets' `chexpert` stores its `label` sequence in this order.
CHEXPERT_CSV_OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
# tfds `chexpert` (3.1.0) ClassLabel names, index = stored id ('-1.0', '1.0', '0.0', '' in the CSV).
CHEXPERT_TFDS_CLASS_NAMES = ("uncertain", "positive", "negative", "unmentioned")
_TFDS_ID_TO_RAW = np.array([-1.0, 1.0, 0.0, np.nan])


def chexpert_targets(raw, label_names: Sequence[str] = CHEXPERT_LABELS) -> np.ndarray:
    """Raw CheXpert values [N, L] (1, 0, -1 uncertain, NaN blank) -> float32 0/1 targets by the policy."""
    raw = np.asarray(raw, np.float64)
    names = tuple(label_names)
    if raw.ndim != 2 or raw.shape[1] != len(names):
        raise ValueError(f"raw labels must be [N, {len(names)}] for {names}, got shape {raw.shape}")
    unknown = [n for n in names if n not in CHEXPERT_UNCERTAIN_TO]
    if unknown:
        raise ValueError(f"no uncertainty policy for {unknown}; known labels: {list(CHEXPERT_UNCERTAIN_TO)}")
    finite = raw[np.isfinite(raw)]
    bad = np.setdiff1d(finite, [-1.0, 0.0, 1.0])
    if bad.size or np.any(np.isinf(raw)):
        raise ValueError(
            f"CheXpert label values must be 1, 0, -1 (uncertain) or NaN (blank), got {bad[:10].tolist()}"
        )
    out = np.where(np.isnan(raw), 0.0, raw)
    for j, name in enumerate(names):
        col = out[:, j]
        col[col == -1.0] = CHEXPERT_UNCERTAIN_TO[name]
    return out.astype(np.float32)


def _parse_csv_value(value: Any, column: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, str):
        value = value.strip()
        if value == "":
            return math.nan
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"column {column!r}: cannot parse {value!r} as a CheXpert label") from None
    return float(value)


def chexpert_targets_from_csv_rows(
    rows: Iterable[Mapping[str, Any]], label_names: Sequence[str] = CHEXPERT_LABELS
) -> np.ndarray:
    """Targets from CheXpert CSV rows (e.g. `csv.DictReader(open('valid.csv'))`): '1.0', '0.0', '-1.0', ''."""
    names = tuple(label_names)
    raw = []
    for i, row in enumerate(rows):
        missing = [n for n in names if n not in row]
        if missing:
            raise ValueError(f"row {i} has no column(s) {missing}; is this a CheXpert train/valid CSV?")
        raw.append([_parse_csv_value(row[n], n) for n in names])
    return chexpert_targets(np.asarray(raw, np.float64).reshape(-1, len(names)), names)


def chexpert_targets_from_tfds(label_ids, label_names: Sequence[str] = CHEXPERT_LABELS) -> np.ndarray:
    """Targets from tfds `chexpert` `label` ids [N, 14]: 0 uncertain, 1 positive, 2 negative, 3 blank."""
    ids = np.asarray(label_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] != len(CHEXPERT_CSV_OBSERVATIONS):
        raise ValueError(
            f"tfds chexpert labels must be [N, {len(CHEXPERT_CSV_OBSERVATIONS)}] ids, got shape {ids.shape}"
        )
    if not np.issubdtype(ids.dtype, np.integer) or ids.min(initial=0) < 0 or ids.max(initial=0) > 3:
        raise ValueError(f"tfds chexpert label ids must be integers 0..3 {CHEXPERT_TFDS_CLASS_NAMES}")
    cols = [CHEXPERT_CSV_OBSERVATIONS.index(n) for n in label_names]
    return chexpert_targets(_TFDS_ID_TO_RAW[ids[:, cols]], label_names)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    # Start/end of each run of equal values.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(scores, targets) -> float:
    """Binary ROC AUC of `scores` for 0/1 `targets`; ValueError when only one class is present."""
    scores = np.asarray(scores, np.float64).ravel()
    targets = np.asarray(targets).ravel()
    if scores.shape != targets.shape:
        raise ValueError(f"scores and targets differ in size: {scores.shape} vs {targets.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or inf")
    if not np.all((targets == 0) | (targets == 1)):
        raise ValueError("targets must be 0/1 (map CheXpert values with chexpert_targets first)")
    pos = targets == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC is undefined when the targets hold only one class")
    ranks = _average_ranks(scores)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def mean_auroc(
    scores, targets, label_names: Sequence[str] = CHEXPERT_LABELS, *, valid=None
) -> dict[str, Any]:
    """Per-label AUROC and their mean over the labels that have both classes in the evaluation set.

    scores: [N, L] logits or probabilities; targets: [N, L] 0/1 (after the uncertainty policy);
    valid: optional bool [N] selecting real examples (padded batches).
    Returns {'mean_auroc', 'per_label': {name: auroc or None}, 'num_labels_scored', 'skipped',
    'warnings', 'num_eval'}. Raises ValueError when no label can be scored.
    """
    scores = np.asarray(scores, np.float64)
    targets = np.asarray(targets)
    names = tuple(label_names)
    if scores.ndim != 2 or scores.shape != targets.shape or scores.shape[1] != len(names):
        raise ValueError(
            f"scores and targets must both be [N, {len(names)}] for {names}, got {scores.shape} and "
            f"{targets.shape}"
        )
    keep = np.ones(len(scores), bool) if valid is None else np.asarray(valid, bool)
    if keep.shape != (len(scores),):
        raise ValueError(f"valid must be bool [N]={len(scores)}, got shape {keep.shape}")
    scores, targets = scores[keep], targets[keep]
    per_label: dict[str, float | None] = {}
    skipped, notes = [], []
    for j, name in enumerate(names):
        col = targets[:, j]
        if not np.all((col == 0) | (col == 1)):
            raise ValueError(f"targets for {name!r} must be 0/1 (apply chexpert_targets to raw labels)")
        classes = np.unique(col)
        if len(classes) < 2:
            msg = (
                f"{name}: all {len(col)} evaluation targets are {classes.tolist() or '[]'}; AUROC is "
                "undefined, label left out of the mean"
            )
            per_label[name] = None
            skipped.append(name)
            notes.append(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            continue
        per_label[name] = auroc(scores[:, j], col)
    scored = [v for v in per_label.values() if v is not None]
    if not scored:
        raise ValueError(
            f"no label has both classes among the {len(scores)} evaluation examples; use a larger or "
            "different evaluation set"
        )
    return {
        "mean_auroc": float(np.mean(scored)),
        "per_label": per_label,
        "num_labels_scored": len(scored),
        "skipped": skipped,
        "warnings": notes,
        "num_eval": int(len(scores)),
    }
