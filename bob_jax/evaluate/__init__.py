"""Evaluation metrics: retrieval (BoB / revisited Oxford-Paris), weighted k-NN, calibration (NLL,
ECE), CheXpert-style multi-label AUROC and ImageNet-A/R masked accuracy.

``knn`` imports jax; the others are numpy. All are imported lazily here so that importing one
submodule stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "calibration_metrics",
    "expected_calibration_error",
    "mean_auroc",
    "masked_top1",
    "masked_topk_accuracy",
    "nll",
    "class_folder_split",
    "knn_accuracy",
    "knn_classify",
    "knn_classify_multi",
    "rank_database",
    "retrieval_metrics",
    "revisited_evaluate",
    "revisited_ground_truth",
    "revisited_map",
]

_WHERE = {
    "calibration_metrics": "calibration",
    "expected_calibration_error": "calibration",
    "nll": "calibration",
    "mean_auroc": "multilabel",
    "masked_top1": "ood",
    "masked_topk_accuracy": "ood",
    "class_folder_split": "retrieval",
    "rank_database": "retrieval",
    "retrieval_metrics": "retrieval",
    "revisited_evaluate": "retrieval",
    "revisited_ground_truth": "retrieval",
    "revisited_map": "retrieval",
    "knn_accuracy": "knn",
    "knn_classify": "knn",
    "knn_classify_multi": "knn",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
