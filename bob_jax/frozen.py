"""Frozen-feature tasks: each reads cached train/test features and returns metrics.

A task entry names its primary metric (what the ranking scores) and turns the task's config
section into keyword arguments. A task returns `(metrics, per_example)`: `per_example` holds the
primary metric per test example (or None), which the report resamples for bootstrap intervals. Linear probe (BoB/MAE recipe, LARS), kNN (DINO temperature
weighting) and retrieval (test queries against the train database, same class = positive).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from bob_jax.features import Features


@dataclasses.dataclass(frozen=True)
class DataSplits:
    """The raw sources behind the features (for tasks that need file names, ground truth or masks)."""

    train: Any
    test: Any


@dataclasses.dataclass(frozen=True)
class FrozenTask:
    """`run(train, test, *, num_classes, cfg, mesh, workdir, progress, sources) -> (metrics, per_example)`.

    `output` names the features the task reads (a model output key or a descriptor registered in
    `bob_jax.features.DESCRIPTORS`), or is `output(model, cfg) -> name` when it depends on the backbone;
    the job extracts each distinct output once. `needs_train=False`: `train` is None (query/database
    protocols that read only the evaluation split)."""

    name: str
    primary_metric: str
    run: Callable[..., tuple[dict[str, float], np.ndarray | None]]
    output: str | Callable[[Any, Mapping[str, Any]], str] = "pooled"
    needs_train: bool = True

    def output_for(self, model, cfg: Mapping[str, Any]) -> str:
        return self.output if isinstance(self.output, str) else self.output(model, cfg)


def linear_probe(train: Features, test: Features, *, num_classes: int, cfg: Mapping[str, Any], mesh, workdir,
                 progress: bool, sources: DataSplits | None = None) -> tuple[dict[str, float], np.ndarray | None]:
    from bob_jax.tasks.linear_probe import LinearProbeConfig, run_linear_probe

    out = run_linear_probe(
        train.features, train.labels, test.features, test.labels,
        num_classes=num_classes, config=LinearProbeConfig(**dict(cfg)), mesh=mesh, workdir=workdir,
        progress=progress,
    )
    return {k: float(v) for k, v in out.items() if np.isscalar(v) and not isinstance(v, str)}, None


def knn(train: Features, test: Features, *, num_classes: int, cfg: Mapping[str, Any], mesh, workdir,
        progress: bool, sources: DataSplits | None = None) -> tuple[dict[str, float], np.ndarray | None]:
    from bob_jax.evaluate.knn import knn_classify_multi

    ks = tuple(sorted({int(cfg["k"]), *(int(k) for k in cfg["extra_ks"])}))
    preds = knn_classify_multi(
        train.features, train.labels, test.features, num_classes=num_classes, ks=ks,
        temperature=float(cfg["temperature"]),
    )
    metrics = {f"top1@k={k}": float(np.mean(np.asarray(p) == test.labels)) for k, p in preds.items()}
    metrics["top1"] = metrics[f"top1@k={int(cfg['k'])}"]
    correct = (np.asarray(preds[int(cfg["k"])]) == test.labels).astype(np.float64)
    return metrics, correct


def retrieval(train: Features, test: Features, *, num_classes: int, cfg: Mapping[str, Any], mesh, workdir,
              progress: bool, sources: DataSplits | None = None) -> tuple[dict[str, float], np.ndarray | None]:
    from bob_jax.evaluate.retrieval import retrieval_metrics

    metrics, per_query = retrieval_metrics(
        test.features, train.features, test.labels, train.labels, ks=tuple(cfg["ks"]), return_per_query=True
    )
    return metrics, per_query["AP_revisited"]


TASKS = {
    "linear_probe": FrozenTask("linear_probe", "top1", linear_probe),
    "knn": FrozenTask("knn", "top1", knn),
    "retrieval": FrozenTask("retrieval", "mAP_revisited", retrieval),
}
