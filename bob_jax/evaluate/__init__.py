"""Evaluation metrics on frozen features: retrieval (BoB / revisited Oxford-Paris) and weighted k-NN.

``retrieval`` is pure numpy; ``knn`` imports jax. Both are imported lazily here so that
``import bob_jax.evaluate.retrieval`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
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
