"""Frozen-feature tasks: each reads cached train/test features and returns metrics.

A task entry names its primary metric (what the ranking scores) and turns the task's config
section into keyword arguments. A task returns `(metrics, per_example)`: `per_example` holds the
primary metric per test example (or None), which the report resamples for bootstrap intervals. Linear probe (BoB/MAE recipe, LARS), kNN (DINO temperature
weighting), retrieval (test queries against the train database, same class = positive), DINOv2's
multi-head linear evaluation and a multi-label (CheXpert-style, mean AUROC) linear probe.
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
    protocols that read only the evaluation split). `primary_metric` and `needs_train` may also be
    functions of the task's config section (e.g. the retrieval protocol)."""

    name: str
    primary_metric: str | Callable[[Mapping[str, Any]], str]
    run: Callable[..., tuple[dict[str, float], np.ndarray | None]]
    output: str | Callable[[Any, Mapping[str, Any]], str] = "pooled"
    needs_train: bool | Callable[[Mapping[str, Any]], bool] = True

    def output_for(self, model, cfg: Mapping[str, Any]) -> str:
        return self.output if isinstance(self.output, str) else self.output(model, cfg)

    def primary_for(self, cfg: Mapping[str, Any]) -> str:
        return self.primary_metric if isinstance(self.primary_metric, str) else self.primary_metric(cfg)

    def train_needed(self, cfg: Mapping[str, Any]) -> bool:
        return self.needs_train if isinstance(self.needs_train, bool) else bool(self.needs_train(cfg))


def linear_probe(train: Features, test: Features, *, num_classes: int, cfg: Mapping[str, Any], mesh, workdir,
                 progress: bool, sources: DataSplits | None = None) -> tuple[dict[str, float], np.ndarray | None]:
    from bob_jax.tasks.linear_probe import LinearProbeConfig, head_logits_numpy, run_linear_probe

    out = run_linear_probe(
        train.features, train.labels, test.features, test.labels,
        num_classes=num_classes, config=LinearProbeConfig(**dict(cfg)), mesh=mesh, workdir=workdir,
        progress=progress, return_state=True,
    )
    # Per-example correctness of the trained head (float64 replay), for bootstrap intervals.
    logits = head_logits_numpy(out.pop("head_state"), test.features)
    correct = (np.argmax(logits, axis=1) == test.labels).astype(np.float64)
    return {k: float(v) for k, v in out.items() if np.isscalar(v) and not isinstance(v, str)}, correct


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
    """`cfg.protocol`: "split" (test queries, train database), "class_folder" (one class-folder source split
    per class by sorted file name) or "revisited" (ROxford / RParis ground truth); per-query AP returned."""
    from bob_jax.evaluate import retrieval as R

    protocol, ks = R.check_protocol(cfg["protocol"]), tuple(cfg["ks"])
    if protocol == "split":
        metrics, per_query = R.retrieval_metrics(
            test.features, train.features, test.labels, train.labels, ks=ks, return_per_query=True
        )
        return metrics, per_query["AP_revisited"]
    if protocol == "class_folder":
        metrics, per_query = R.class_folder_retrieval(
            test.features, test.labels, R.source_names(sources.test), ks=ks,
            query_fraction=float(cfg["query_fraction"]), max_per_class=int(cfg["max_per_class"]) or None,
        )
        return metrics, per_query["AP_revisited"]
    return R.revisited_task(test, sources.test, ks=ks)


def retrieval_primary(cfg: Mapping[str, Any]) -> str:
    return "mAP_medium" if cfg["protocol"] == "revisited" else "mAP_revisited"  # BoB's numbers


def retrieval_needs_train(cfg: Mapping[str, Any]) -> bool:
    from bob_jax.evaluate.retrieval import check_protocol

    return check_protocol(cfg["protocol"]) == "split"


def retrieval_output(model, cfg: Mapping[str, Any]) -> str:
    """`descriptor`: "bob" (the original's choice per backbone family) or "pooled"."""
    from bob_jax.evaluate.retrieval import bob_descriptor

    if cfg["descriptor"] == "pooled":
        return "pooled"
    if cfg["descriptor"] == "bob":
        return bob_descriptor(model)
    raise ValueError(f"retrieval.descriptor={cfg['descriptor']!r}: use 'bob' (the original's per-family "
                     "descriptor) or 'pooled'")


def linear_multihead(train: Features, test: Features, *, num_classes: int, cfg: Mapping[str, Any], mesh,
                     workdir, progress: bool,
                     sources: DataSplits | None = None) -> tuple[dict[str, float], np.ndarray | None]:
    from bob_jax.tasks.linear_multihead import MultiHeadConfig, run_linear_multihead

    if train.output != test.output:
        raise ValueError(f"linear_multihead: train features are {train.output!r}, test {test.output!r}")
    return run_linear_multihead(
        train.features, train.labels, test.features, test.labels, num_classes=num_classes,
        output=train.output, config=MultiHeadConfig(**dict(cfg)), mesh=mesh, workdir=workdir,
    )


def _multihead_output(model, cfg: Mapping[str, Any]) -> str:
    # Imported here: importing the task module registers its descriptor before the job extracts it.
    from bob_jax.tasks.linear_multihead import feature_output

    return feature_output(model, cfg)


def multilabel_probe(train: Features, test: Features, *, num_classes: int, cfg: Mapping[str, Any], mesh,
                     workdir, progress: bool,
                     sources: DataSplits | None = None) -> tuple[dict[str, float], np.ndarray | None]:
    from bob_jax.tasks.multilabel_probe import MultilabelProbeConfig, label_names, run_multilabel_probe

    names = label_names(np.shape(test.labels)[-1], None if sources is None else sources.test)
    metrics, _ = run_multilabel_probe(
        train.features, train.labels, test.features, test.labels,
        config=MultilabelProbeConfig(**dict(cfg)), mesh=mesh, names=names,
    )
    return metrics, None  # AUROC is not a mean over examples: no per-example values to resample


TASKS = {
    "linear_probe": FrozenTask("linear_probe", "top1", linear_probe),
    "knn": FrozenTask("knn", "top1", knn),
    "retrieval": FrozenTask("retrieval", retrieval_primary, retrieval, output=retrieval_output,
                            needs_train=retrieval_needs_train),
    # DINOv2's linear evaluation: a grid of heads, chosen on a held-out part of train (token models read
    # the last four class tokens + mean patch token, other models their pooled feature).
    "linear_multihead": FrozenTask("linear_multihead", "top1", linear_multihead, output=_multihead_output),
    "multilabel_probe": FrozenTask("multilabel_probe", "mean_auroc", multilabel_probe),
}
