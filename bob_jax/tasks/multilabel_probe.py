"""Multi-label linear probe (CheXpert style, bob-spec section 3.3) on frozen features.

One `Linear(D, L)` head over L binary labels, sigmoid binary cross-entropy (mean over examples and
labels), scored by the per-label ROC AUC on the test split and its mean over the labels
(`bob_jax.evaluate.multilabel.mean_auroc`: a label whose test targets hold one class is left out and
reported).

Optimiser: AdamW. BoB's CheXpert run fine-tunes the whole network with AdamW, lr 1e-3, weight
decay 1e-3, 10 warm-up epochs, cosine to a minimum lr 1e-5; the probe keeps that optimiser and those
values (absolute lr, no batch scaling) with a linear warm-up over `warmup_epochs` from 0. AdamW rather
than the MAE probe's LARS because the original CheXpert recipe is AdamW, and its per-coordinate step
suits a head with a few output units (LARS normalises the step by the whole weight's norm).
Weight decay applies to the weight matrix only (timm's optimiser factory exempts biases).

Features are standardised with the training split's per-dimension mean and standard deviation (a
fixed, non-affine BatchNorm, cf. the MAE probe's BatchNorm): Adam's steps have a fixed size per
coordinate, so without it the same lr would move logits by very different amounts for backbones whose
features differ in scale. Head weights start from N(0, 0.01), biases from 0.

Training data are seeded per-epoch permutations in drop_last batches of min(batch_size, N) rounded down
to a multiple of the data shards; one jitted step per batch over the mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bob_jax import parallel
from bob_jax.evaluate.multilabel import mean_auroc
from bob_jax.tasks.linear_multihead import global_batch_size
from bob_jax.tasks.linear_probe import EpochBatchIndices
from bob_jax.train.optim import warmup_cosine


@dataclasses.dataclass(frozen=True)
class MultilabelProbeConfig:
    epochs: int = 50
    warmup_epochs: int = 5
    batch_size: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 1e-3
    standardize: bool = True
    init_std: float = 0.01
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"multilabel_probe: epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}"
            )
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                f"multilabel_probe: warmup_epochs={self.warmup_epochs} must lie in [0, epochs={self.epochs}]"
            )
        if self.lr <= 0 or self.min_lr < 0 or self.weight_decay < 0:
            raise ValueError(
                f"multilabel_probe: need lr > 0, min_lr >= 0, weight_decay >= 0; got {self.lr}, "
                f"{self.min_lr}, {self.weight_decay}"
            )


def check_targets(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Multi-label targets [N, L] as float32 0/1; an error that says what to use otherwise."""
    y = np.asarray(y)
    if y.ndim != 2:
        raise ValueError(
            f"multilabel_probe: {name} labels must be multi-label targets [N, L], got shape {y.shape}; a "
            "single-label source (class ids) belongs to linear_probe / linear_multihead"
        )
    if np.ndim(x) != 2 or len(x) != len(y):
        raise ValueError(
            f"multilabel_probe: {name} features must be [N, D] with N = {len(y)}, got {np.shape(x)}"
        )
    if not np.all((y == 0) | (y == 1)):
        raise ValueError(
            f"multilabel_probe: {name} targets must be 0/1 (apply the uncertainty policy, e.g. "
            "bob_jax.evaluate.multilabel.chexpert_targets, first)"
        )
    return y.astype(np.float32)


def standardizer(x: np.ndarray, enabled: bool, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of the training features, accumulated in float64 over row chunks (no float64 copy of
    x); the scale is floored at 1 for constant dimensions, which then stay 0."""
    dim = np.shape(x)[1]
    if not enabled:
        return np.zeros(dim, np.float32), np.ones(dim, np.float32)
    total, squares = np.zeros(dim), np.zeros(dim)
    for start in range(0, len(x), chunk):
        part = np.asarray(x[start : start + chunk], np.float64)
        total += part.sum(axis=0)
        squares += np.square(part).sum(axis=0)
    mean = total / len(x)
    std = np.sqrt(np.maximum(squares / len(x) - np.square(mean), 0.0))
    return mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)


def make_optimizer(config: MultilabelProbeConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    schedule = warmup_cosine(
        config.lr, config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch, config.min_lr
    )
    return optax.adamw(
        schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay, mask={"w": True, "b": False}
    )


def train_probe(
    x: np.ndarray, y: np.ndarray, config: MultilabelProbeConfig, mesh: jax.sharding.Mesh
) -> tuple[dict[str, jax.Array], int]:
    """Head {"w": [D, L], "b": [L]} trained on standardised x [N, D] and targets y [N, L]; and the steps."""
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    batch = global_batch_size(config.batch_size, len(y), mesh)
    sampler = EpochBatchIndices(len(y), batch, config.seed)
    tx = make_optimizer(config, sampler.steps_per_epoch)
    rng = np.random.default_rng(config.seed)
    params = {
        "w": (config.init_std * rng.standard_normal((x.shape[1], y.shape[1]))).astype(np.float32),
        "b": np.zeros((y.shape[1],), np.float32),
    }
    state = jax.device_put({"params": params, "opt": tx.init(params)}, rep)

    def step(state, xb, yb):
        def loss_fn(p):
            return jnp.mean(optax.sigmoid_binary_cross_entropy(xb @ p["w"] + p["b"], yb))

        grads = jax.grad(loss_fn)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}

    step = jax.jit(step, in_shardings=(rep, data, data), out_shardings=rep, donate_argnums=(0,))
    total = sampler.steps_per_epoch * config.epochs
    for t in range(total):
        idx = np.sort(sampler(t))
        b = parallel.shard_global_batch({"x": x[idx], "y": y[idx]}, mesh)
        state = step(state, b["x"], b["y"])
    return state["params"], total


def probe_logits(
    params: dict[str, jax.Array], x: np.ndarray, mesh: jax.sharding.Mesh, batch_size: int = 256
) -> np.ndarray:
    """[N, L] float32 logits, in fixed-size padded batches sharded over the mesh."""
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    shards = parallel.num_data_shards(mesh)
    batch_size = -(-batch_size // shards) * shards
    fn = jax.jit(lambda p, xb: xb @ p["w"] + p["b"], in_shardings=(rep, data), out_shardings=rep)
    out = []
    for start in range(0, len(x), batch_size):
        idx = np.arange(start, start + batch_size)
        keep = idx < len(x)
        xb = parallel.shard_global_batch({"x": x[np.where(keep, idx, 0)]}, mesh)["x"]
        out.append(np.asarray(fn(params, xb))[keep])
    return np.concatenate(out).astype(np.float32)


def label_names(num_labels: int, source: Any = None) -> tuple[str, ...]:
    """The source's `class_names` when it names every label, else label_0 .. label_{L-1}."""
    names = tuple(getattr(source, "class_names", None) or ())
    return names if len(names) == num_labels else tuple(f"label_{j}" for j in range(num_labels))


def run_multilabel_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    config: MultilabelProbeConfig | None = None,
    mesh: jax.sharding.Mesh | None = None,
    names: Sequence[str] | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """Train on (train_x, train_y), score the test split; returns (metrics, test logits [N, L]).

    metrics (numbers): mean_auroc, auroc/<label> per scored label, num_labels_scored, num_labels_skipped
    (labels whose test targets hold one class; `mean_auroc` warns about each), test_bce, steps, batch_size.
    """
    config = config or MultilabelProbeConfig()
    mesh = mesh or parallel.make_mesh()
    train_y, test_y = check_targets("train", train_x, train_y), check_targets("test", test_x, test_y)
    if train_y.shape[1] != test_y.shape[1] or np.shape(train_x)[1] != np.shape(test_x)[1]:
        raise ValueError(
            f"multilabel_probe: train and test differ in labels or feature width: "
            f"{np.shape(train_x)}/{train_y.shape} vs {np.shape(test_x)}/{test_y.shape}"
        )
    names = tuple(names) if names is not None else label_names(train_y.shape[1])
    mean, scale = standardizer(train_x, config.standardize)
    train_x = ((np.asarray(train_x, np.float32) - mean) / scale).astype(np.float32)
    test_x = ((np.asarray(test_x, np.float32) - mean) / scale).astype(np.float32)
    params, steps = train_probe(train_x, train_y, config, mesh)
    logits = probe_logits(params, test_x, mesh)
    scored = mean_auroc(logits, test_y, names)
    bce = optax.sigmoid_binary_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(test_y))
    metrics = {
        "mean_auroc": scored["mean_auroc"],
        **{f"auroc/{n}": v for n, v in scored["per_label"].items() if v is not None},
        "num_labels_scored": float(scored["num_labels_scored"]),
        "test_bce": float(jnp.mean(bce)),
        "steps": float(steps),
        "batch_size": float(global_batch_size(config.batch_size, len(train_y), mesh)),
        "num_labels_skipped": float(len(scored["skipped"])),
    }
    return metrics, logits
