"""Calibration metrics for any classifier: negative log-likelihood and expected calibration error.

ECE (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017; Naeini et al. 2015): confidence
is the max softmax probability, the prediction its argmax; examples go into `n_bins` equal-width
confidence bins and

    ECE = sum_b (|B_b| / N) * |acc(B_b) - conf(B_b)|

Bin edge convention: bin k holds confidences in (k/n, (k+1)/n] (closed on the right, as in Guo et al.'s
reference code, `conf > lower and conf <= upper`), computed as `clip(ceil(conf * n) - 1, 0, n - 1)`; a
confidence of exactly 0 (impossible for a softmax, whose max is >= 1/C) goes to bin 0. This is the same
binning as `bob_jax.tasks.linear_probe` (15 bins), so both report the same number.

Streaming: `calibration_bins` returns per-bin sums (count, confidence, correct) that add across batches;
`ece_from_bins` turns the totals into the ECE. numpy, float64 throughout.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "DEFAULT_ECE_BINS",
    "calibration_bins",
    "calibration_metrics",
    "ece_from_bins",
    "expected_calibration_error",
    "log_softmax",
    "nll",
]

DEFAULT_ECE_BINS = 15


def _check_labels(labels, n: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer [batch]={n}, got {labels.dtype} {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]"
        )
    return labels.astype(np.int64)


def _check_valid(valid, n: int) -> np.ndarray:
    keep = np.ones((n,), bool) if valid is None else np.asarray(valid, bool)
    if keep.shape != (n,):
        raise ValueError(f"valid must be bool [batch]={n}, got shape {keep.shape}")
    return keep


def _check_2d(x, what: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"{what} must be [batch, classes >= 2], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} contain NaN or inf; the classifier diverged or the input is broken")
    return x


def log_softmax(logits) -> np.ndarray:
    """Numerically stable log-softmax over the last axis (float64)."""
    x = np.asarray(logits, np.float64)
    x = x - np.max(x, axis=-1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def nll(logits, labels, *, valid=None) -> float:
    """Mean negative log-likelihood (softmax cross-entropy) of integer `labels` under `logits` [B, C]."""
    logits = _check_2d(logits, "logits")
    labels = _check_labels(labels, logits.shape[0], logits.shape[1])
    keep = _check_valid(valid, len(labels))
    if not keep.any():
        raise ValueError("no valid examples to score")
    logp = log_softmax(logits[keep])
    return float(-np.mean(logp[np.arange(len(logp)), labels[keep]]))


def _check_probs(probs) -> np.ndarray:
    probs = _check_2d(probs, "probs")
    # Catches logits passed by mistake; loose enough for probabilities computed in bfloat16.
    if probs.min() < 0 or np.max(np.abs(probs.sum(axis=1) - 1.0)) > 1e-2:
        raise ValueError(
            "probs must be probabilities (non-negative rows summing to 1); for logits use "
            "calibration_metrics(logits, labels) or softmax first"
        )
    return probs


def calibration_bins(probs, labels, n_bins: int = DEFAULT_ECE_BINS, *, valid=None) -> dict[str, np.ndarray]:
    """Per-bin sums {count, confidence, correct} (float64 [n_bins]) over the valid examples."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs.shape[0], probs.shape[1])
    keep = _check_valid(valid, len(labels))
    probs, labels = probs[keep], labels[keep]
    conf = probs.max(axis=1)
    correct = (np.argmax(probs, axis=1) == labels).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    return {
        "count": np.bincount(bins, minlength=n_bins).astype(np.float64),
        "confidence": np.bincount(bins, weights=conf, minlength=n_bins),
        "correct": np.bincount(bins, weights=correct, minlength=n_bins),
    }


def ece_from_bins(bins: dict[str, np.ndarray]) -> float:
    """ECE from (summed) `calibration_bins` output: sum_b |correct_b - confidence_b| / N."""
    total = float(np.sum(bins["count"]))
    if total <= 0:
        raise ValueError("no examples in the calibration bins")
    return float(np.sum(np.abs(np.asarray(bins["correct"]) - np.asarray(bins["confidence"]))) / total)


def expected_calibration_error(probs, labels, n_bins: int = DEFAULT_ECE_BINS, *, valid=None) -> float:
    """ECE of softmax probabilities `probs` [B, C] with equal-width bins (k/n, (k+1)/n]."""
    return ece_from_bins(calibration_bins(probs, labels, n_bins, valid=valid))


def calibration_metrics(logits, labels, n_bins: int = DEFAULT_ECE_BINS, *, valid=None) -> dict[str, float]:
    """{'top1', 'nll', 'ece'} of a classifier's logits [B, C] (ECE over the softmax)."""
    logits = _check_2d(logits, "logits")
    labels = _check_labels(labels, logits.shape[0], logits.shape[1])
    keep = _check_valid(valid, len(labels))
    if not keep.any():
        raise ValueError("no valid examples to score")
    probs = np.exp(log_softmax(logits))
    return {
        "top1": float(np.mean(np.argmax(logits[keep], axis=1) == labels[keep])),
        "nll": nll(logits, labels, valid=keep),
        "ece": expected_calibration_error(probs, labels, n_bins, valid=keep),
    }
