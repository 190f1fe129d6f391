"""Linear probing of frozen backbone features: BoB's classification linear probe (MAE recipe).

Source of the recipe: BoB `bob-classification`'s linear-probing script, which is MAE's
`main_linprobe.py` (facebookresearch/mae) — see bob-spec.md §3.2:
  * head = non-affine `BatchNorm1d(D, eps=1e-6)` followed by `Linear(D, C)`; weight init
    `trunc_normal_(std=0.01)`, zero bias. (BoB adds the BN only for model names containing
    vit/swin/conv/stable: `use_bn` here.)
  * LARS (util/lars.py), base lr 0.1, absolute lr = base * effective batch / 256, weight decay 0,
    momentum 0.9; per-iteration schedule: 10 linear warmup epochs from 0 then half-cosine to 0,
    90 epochs; cross-entropy; `drop_last=True` training loader.

Implementation (style.md §4, functional core): the NNX head is split once into
`graphdef, params, batch_stats`; the jitted train step is a pure function of
`(train_state, batch, feature_params)` with explicit shardings over a mesh (batch split over "data",
state replicated) and the state donated; `nnx.merge` happens inside the step.

Data paths:
  (a) cached features (default): `features [N, D]` in host memory; each step gathers one global
      batch by index. Batches come from a grain `MapDataset` over step numbers whose element k is
      batch k (`StepBatches`: epoch-wise permutations seeded by (seed, epoch), drop_last), so the
      grain iterator state `{"next_index": k}` is checkpointed and a resumed run sees exactly the
      same batches. Without grain (the GPU image lacks it) `PrefetchStepIterator` yields the same
      batches with the same state format. Per-example grain shuffling is avoided on purpose: 1.28 M
      ImageNet rows x 90 epochs through a per-element Python pipeline costs about an hour of host
      time; a numpy permutation per epoch is ~20 ms.
  (b) uncached: pass `feature_fn` and give uint8 image arrays instead of features; the frozen
      backbone runs inside the step under `jax.lax.stop_gradient`.

Differences to the original worth knowing:
  * BatchNorm statistics are computed over the global batch (all data shards); the original ran
    without SyncBatchNorm, i.e. per-GPU batch statistics.
  * With cached features there is no per-epoch augmentation (RandomResizedCrop + flip) — the cached
    path trains on the centre-crop features; the uncached path can take augmented images.
  * timm's `trunc_normal_(std=0.01)` truncates at absolute +-2 (i.e. +-200 std), which is
    reproduced: effectively an untruncated normal with std 0.01.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bob_jax import parallel
from bob_jax.train.optim import mae_lars, scaled_lr, warmup_cosine

ECE_BINS = 15


# --------------------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------------------


def timm_trunc_normal(std: float = 0.01, a: float = -2.0, b: float = 2.0) -> Callable:
    """timm/torch `trunc_normal_(std, a, b)`: normal(0, std) truncated to the ABSOLUTE range [a, b]."""

    def init(key, shape, dtype=jnp.float32):
        return (std * jax.random.truncated_normal(key, a / std, b / std, shape, jnp.float32)).astype(dtype)

    return init


class TorchBatchNorm1d(nnx.Module):
    """Non-affine BatchNorm1d with torch semantics (running stats in eval, batch stats in training).

    Written out instead of `nnx.BatchNorm` because torch updates `running_var` with the *unbiased*
    batch variance (n / (n - 1)) while normalising with the biased one; flax uses the biased variance
    for both. `momentum` uses torch's convention: running = (1 - momentum) * running + momentum * batch.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-6, momentum: float = 0.1):
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if train:
            n = x.shape[0]
            if n < 2:
                raise ValueError("TorchBatchNorm1d: training needs more than one example per batch.")
            mean = jnp.mean(x, axis=0)
            var = jnp.mean(jnp.square(x - mean), axis=0)
            m = self.momentum
            self.mean[...] = (1.0 - m) * self.mean[...] + m * mean
            self.var[...] = (1.0 - m) * self.var[...] + m * var * (n / (n - 1))
        else:
            mean, var = self.mean[...], self.var[...]
        return (x - mean) * jax.lax.rsqrt(var + self.eps)


class LinearProbeHead(nnx.Module):
    """`BatchNorm1d(affine=False, eps=1e-6)` (optional) + `Linear` with trunc-normal(0.01) weights."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        use_bn: bool = True,
        bn_eps: float = 1e-6,
        bn_momentum: float = 0.1,
        rngs: nnx.Rngs,
    ):
        if in_features < 1 or num_classes < 2:
            raise ValueError(
                "LinearProbeHead: need in_features >= 1 and num_classes >= 2, "
                f"got {in_features} and {num_classes}."
            )
        self.bn = TorchBatchNorm1d(in_features, eps=bn_eps, momentum=bn_momentum) if use_bn else None
        self.fc = nnx.Linear(
            in_features,
            num_classes,
            kernel_init=timm_trunc_normal(0.01),
            bias_init=nnx.initializers.zeros_init(),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.bn is not None:
            x = self.bn(x, train=train)
        return self.fc(x)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinearProbeConfig:
    """Hyper-parameters of the linear probe; defaults are the BoB/MAE recipe.

    `batch_size` is the GLOBAL (effective) batch size; lr = base_lr * batch_size / 256.
    `checkpoint_every_steps=None` checkpoints once per epoch (and always at the end).
    """

    epochs: int = 90
    warmup_epochs: int = 10
    batch_size: int = 256
    base_lr: float = 0.1
    end_lr: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.9
    trust_coefficient: float = 0.001
    use_bn: bool = True
    bn_eps: float = 1e-6
    bn_momentum: float = 0.1
    seed: int = 0
    eval_batch_size: int | None = None
    checkpoint_every_steps: int | None = None
    log_every_steps: int = 50

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"LinearProbeConfig: epochs must be >= 1, got {self.epochs}.")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                f"LinearProbeConfig: warmup_epochs={self.warmup_epochs} must lie in "
                f"[0, epochs={self.epochs}]."
            )
        if self.batch_size < 2:
            raise ValueError(f"LinearProbeConfig: batch_size must be >= 2, got {self.batch_size}.")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"LinearProbeConfig: eval_batch_size must be >= 1, got {self.eval_batch_size}.")
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            raise ValueError(
                "LinearProbeConfig: checkpoint_every_steps must be >= 1 or None, "
                f"got {self.checkpoint_every_steps}."
            )
        if self.log_every_steps < 1:
            raise ValueError(f"LinearProbeConfig: log_every_steps must be >= 1, got {self.log_every_steps}.")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"LinearProbeConfig: seed must lie in [0, 2**32), got {self.seed}.")

    @property
    def lr(self) -> float:
        """Absolute peak learning rate."""
        return scaled_lr(self.base_lr, self.batch_size)


# --------------------------------------------------------------------------------------------------
# Pure train / eval steps
# --------------------------------------------------------------------------------------------------


def make_schedule(config: LinearProbeConfig, steps_per_epoch: int) -> Callable:
    """Per-step lr: warmup epochs from 0 to base_lr * batch / 256, then half-cosine to end_lr."""
    return warmup_cosine(
        config.lr, config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch, config.end_lr
    )


def make_optimizer(config: LinearProbeConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """MAE LARS driven by `make_schedule`."""
    return mae_lars(
        make_schedule(config, steps_per_epoch),
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        trust_coefficient=config.trust_coefficient,
    )


def init_train_state(
    head: LinearProbeHead, tx: optax.GradientTransformation
) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """Split the head once; the train state is a plain dict pytree (Orbax-friendly).

    Keys: params, batch_stats (nnx.State), opt_state (optax), step (int32), epoch_loss_sum (float32,
    sum of the losses of the current epoch so far).
    """
    graphdef, params, batch_stats = nnx.split(head, nnx.Param, nnx.BatchStat)
    state = {
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "epoch_loss_sum": jnp.zeros((), jnp.float32),
    }
    return graphdef, state


def create_train_state(
    config: LinearProbeConfig,
    in_features: int,
    num_classes: int,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """Build the head and its train state in ONE jitted call, directly replicated over the mesh.

    Eager NNX construction compiles every initialiser op separately (~1.5 s on CPU even for a linear
    head); a single jit is one small compile (environment.md §8).
    """

    def make_head():
        return LinearProbeHead(
            in_features,
            num_classes,
            use_bn=config.use_bn,
            bn_eps=config.bn_eps,
            bn_momentum=config.bn_momentum,
            rngs=nnx.Rngs(config.seed),
        )

    graphdef = nnx.split(nnx.eval_shape(make_head), nnx.Param, nnx.BatchStat)[0]
    state = jax.jit(lambda: init_train_state(make_head(), tx)[1], out_shardings=parallel.replicated(mesh))()
    return graphdef, state


def _features(batch, feature_fn, feature_params):
    x = batch["inputs"]
    if feature_fn is None:
        return x
    feats = feature_fn(x) if feature_params is None else feature_fn(feature_params, x)
    return jax.lax.stop_gradient(feats)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    steps_per_epoch: int,
    feature_fn: Callable | None = None,
    lr_schedule: Callable | None = None,
) -> Callable:
    """Jitted `step(state, batch, feature_params) -> (state, {"loss", "epoch_loss_sum", "lr"})`.

    `batch = {"inputs": [B, D] features (or images when feature_fn is set), "labels": [B] int}`,
    split over the mesh's "data" axis; the state is replicated and donated.
    """
    rep = parallel.replicated(mesh)

    def step(state, batch, feature_params):
        feats = _features(batch, feature_fn, feature_params)
        labels = batch["labels"]

        def loss_fn(params):
            # copy=True: fresh Variables owned by this (grad) trace; the BN update mutates them, and
            # mutating Variables created at the outer jit level raises a TraceContextError.
            model = nnx.merge(graphdef, params, state["batch_stats"], copy=True)
            logits = model(feats, train=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, nnx.state(model, nnx.BatchStat)

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_epoch = (state["step"] % steps_per_epoch) == 0
        epoch_loss_sum = jnp.where(new_epoch, 0.0, state["epoch_loss_sum"]) + loss
        new_state = {
            "params": params,
            "batch_stats": new_stats,
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "epoch_loss_sum": epoch_loss_sum,
        }
        metrics = {"loss": loss, "epoch_loss_sum": epoch_loss_sum}
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state["step"])
        return new_state, metrics

    return jax.jit(
        step,
        in_shardings=(rep, parallel.data_sharding(mesh), rep),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )


def make_eval_step(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh, feature_fn: Callable | None = None):
    """Jitted `eval(params, batch_stats, batch, feature_params) -> sums` over masked examples.

    Sums (so padded batches combine exactly): count, correct1, correct5, nll, and per-bin count /
    confidence / accuracy for a 15-bin ECE (bins (k/15, (k+1)/15], torch-metrics convention).
    """
    rep = parallel.replicated(mesh)

    def step(params, batch_stats, batch, feature_params):
        feats = _features(batch, feature_fn, feature_params)
        labels = batch["labels"]
        mask = batch["mask"].astype(jnp.float32)
        model = nnx.merge(graphdef, params, batch_stats)
        logits = model(feats, train=False)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        pred = jnp.argmax(logits, axis=-1)
        correct1 = (pred == labels).astype(jnp.float32)
        k = min(5, logits.shape[-1])
        _, topk = jax.lax.top_k(logits, k)
        correctk = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
        conf = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
        bins = jnp.clip(jnp.ceil(conf * ECE_BINS).astype(jnp.int32) - 1, 0, ECE_BINS - 1)
        onehot = jax.nn.one_hot(bins, ECE_BINS) * mask[:, None]
        return {
            "count": jnp.sum(mask),
            "correct1": jnp.sum(correct1 * mask),
            "correct5": jnp.sum(correctk * mask),
            "nll": jnp.sum(nll * mask),
            "bin_count": jnp.sum(onehot, axis=0),
            "bin_conf": jnp.sum(onehot * conf[:, None], axis=0),
            "bin_acc": jnp.sum(onehot * correct1[:, None], axis=0),
        }

    return jax.jit(step, in_shardings=(rep, rep, parallel.data_sharding(mesh), rep), out_shardings=rep)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def _process_slice(global_batch: int) -> slice:
    """The contiguous part of a global batch that this process feeds (all of it when single-process)."""
    n_proc, pid = jax.process_count(), jax.process_index()
    if global_batch % n_proc:
        raise ValueError(f"global batch {global_batch} is not divisible by the {n_proc} processes.")
    local = global_batch // n_proc
    return slice(pid * local, (pid + 1) * local)


class EpochBatchIndices:
    """Maps a global step k to the example indices of batch k: epoch-wise seeded permutations.

    Epoch e uses `np.random.default_rng([seed, e]).permutation(n)`; batch k of the run is slice
    `(k % steps_per_epoch) * B : + B` of epoch `k // steps_per_epoch`'s permutation (drop_last).
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = num_examples // batch_size
        # One cached epoch; grain's prefetch threads call this concurrently.
        self._lock = threading.Lock()
        self._cached: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            if self._cached is None or self._cached[0] != epoch:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
                self._cached = (epoch, perm)
            return self._cached[1]

    def __call__(self, step: int) -> np.ndarray:
        epoch, pos = divmod(int(step), self.steps_per_epoch)
        return self.permutation(epoch)[pos * self.batch_size : (pos + 1) * self.batch_size]


class GatherBatch:
    """Index array -> this process's part of the batch dict {"inputs", "labels"} (host numpy)."""

    def __init__(self, inputs: Any, labels: np.ndarray):
        self.inputs = inputs
        self.labels = labels

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = indices[_process_slice(len(indices))]
        # Sorted reads are much faster for memory-mapped arrays; the order inside a batch is irrelevant
        # for the loss (mean) and the BN statistics only up to float summation order, and sorting keeps
        # the result deterministic.
        indices = np.sort(indices)
        return {
            "inputs": np.asarray(self.inputs[indices]),
            "labels": np.asarray(self.labels[indices], np.int32),
        }


class StepBatches:
    """Random-access training batches: element k is (this process's part of) global batch k.

    A grain data source (`__len__` + `__getitem__`), so `grain.MapDataset.source(StepBatches(...))`
    is the grain pipeline; the iterator state is just the next step index.
    """

    def __init__(self, inputs: Any, labels: np.ndarray, *, batch_size: int, epochs: int, seed: int):
        self.sampler = EpochBatchIndices(len(labels), batch_size, seed)
        if self.sampler.steps_per_epoch == 0:
            raise ValueError(
                f"linear probe: the training set has {len(labels)} examples, fewer than one batch of "
                f"{batch_size}; lower batch_size."
            )
        self.gather = GatherBatch(inputs, labels)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self._len = self.steps_per_epoch * epochs

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        if not 0 <= step < self._len:
            raise IndexError(f"step {step} outside [0, {self._len}).")
        return self.gather(self.sampler(step))


def make_train_dataset(inputs: Any, labels: np.ndarray, *, batch_size: int, epochs: int, seed: int):
    """grain `MapDataset` whose element k is global batch k (see `EpochBatchIndices`)."""
    import grain

    return grain.MapDataset.source(
        StepBatches(inputs, labels, batch_size=batch_size, epochs=epochs, seed=seed)
    )


class PrefetchStepIterator:
    """Ordered, thread-prefetching iterator over `StepBatches` with grain's state format.

    Used where grain is not installed (the GPU image of environment.md §1 lacks it). `get_state()`
    returns `{"next_index": k}` exactly like grain's `MapDataset.to_iter_dataset()` iterator, so
    checkpoints move freely between machines with and without grain.
    """

    def __init__(self, batches: StepBatches, *, prefetch: int = 4, threads: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self._batches = batches
        self._prefetch = prefetch
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bob_jax_batches")
        self._pending: collections.deque = collections.deque()
        self._next = 0

    def _fill(self) -> None:
        scheduled = self._next + len(self._pending)
        while len(self._pending) < self._prefetch and scheduled < len(self._batches):
            self._pending.append(self._pool.submit(self._batches.__getitem__, scheduled))
            scheduled += 1

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._next >= len(self._batches):
            raise StopIteration
        self._fill()
        batch = self._pending.popleft().result()
        self._next += 1
        self._fill()
        return batch

    def get_state(self) -> dict[str, int]:
        return {"next_index": self._next}

    def set_state(self, state: Mapping[str, Any]) -> None:
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._next = int(state["next_index"])

    def close(self) -> None:
        self.set_state({"next_index": self._next})
        self._pool.shutdown(wait=True, cancel_futures=True)


def train_iterator(batches: StepBatches, data_state: Mapping[str, Any] | None = None, *, use_grain=None):
    """Checkpointable iterator over `batches`: grain's when importable (or `use_grain=True`), else
    `PrefetchStepIterator`; both start at `data_state` (`{"next_index": k}`) when given."""
    if use_grain is None:
        try:
            import grain  # noqa: F401

            use_grain = True
        except ImportError:
            use_grain = False
    if use_grain:
        import grain

        # Small prefetch: a batch of ImageNet features is ~16 MB; grain's default buffer is 500 elements.
        options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
        it = iter(grain.MapDataset.source(batches).to_iter_dataset(options))
    else:
        it = PrefetchStepIterator(batches)
    if data_state is not None:
        it.set_state(data_state)
    return it


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def evaluate(
    eval_step: Callable,
    params: Any,
    batch_stats: Any,
    inputs: Any,
    labels: np.ndarray,
    *,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    num_classes: int,
    feature_params: Any = None,
) -> dict[str, float]:
    """Exact metrics over every example once: the last batch is padded (index 0) and masked."""
    labels = np.asarray(labels)
    n = len(labels)
    if n == 0:
        raise ValueError("linear probe: the evaluation set is empty.")
    totals = None
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        mask = idx < n
        idx = np.where(mask, idx, 0)
        part = _process_slice(batch_size)
        idx, mask = idx[part], mask[part]
        batch = {"inputs": np.asarray(inputs[idx]), "labels": labels[idx].astype(np.int32), "mask": mask}
        sums = eval_step(params, batch_stats, parallel.shard_batch(batch, mesh), feature_params)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(totals))
    count = totals["count"]
    out = {
        "top1": float(totals["correct1"] / count),
        "nll": float(totals["nll"] / count),
        "ece": float(np.sum(np.abs(totals["bin_acc"] - totals["bin_conf"])) / count),
        "num_eval": int(round(float(count))),
    }
    if num_classes >= 5:
        out["top5"] = float(totals["correct5"] / count)
    return out


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def _check_arrays(name: str, inputs: Any, labels: Any, num_classes: int, feature_fn) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"linear probe: {name} labels must be 1-D [N], got shape {labels.shape}.")
    if len(inputs) != len(labels):
        raise ValueError(
            f"linear probe: {name} has {len(inputs)} inputs but {len(labels)} labels; they must match."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"linear probe: {name} labels must be integers, got {labels.dtype}.")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"linear probe: {name} labels span [{labels.min()}, {labels.max()}] outside [0, {num_classes})."
        )
    if feature_fn is None and np.ndim(inputs) != 2:
        raise ValueError(
            f"linear probe: cached {name} features must be [N, D], got shape {np.shape(inputs)}; "
            "pass feature_fn to train on images."
        )
    return labels


# Config fields that do not change the trained head; a resumed run may change them.
_RESUME_FREE_FIELDS = frozenset({"eval_batch_size", "checkpoint_every_steps", "log_every_steps"})


def _fingerprint(inputs: Any, labels: np.ndarray) -> str:
    """Cheap identity of a training set: all labels + 16 evenly spaced input rows."""
    h = hashlib.sha256(np.ascontiguousarray(labels).tobytes())
    rows = np.unique(np.linspace(0, len(labels) - 1, num=min(len(labels), 16)).astype(np.int64))
    h.update(np.ascontiguousarray(np.asarray(inputs[rows])).tobytes())
    return h.hexdigest()[:16]


def _check_same_run(saved: Mapping[str, Any], run_meta: Mapping[str, Any], workdir: str) -> None:
    """Refuse to resume checkpoints written by a run with other data or training settings."""
    mismatched = {k: (saved.get(k), v) for k, v in run_meta.items() if k != "config" and saved.get(k) != v}
    saved_cfg = saved.get("config", {})
    mismatched.update(
        {
            f"config.{k}": (saved_cfg.get(k), v)
            for k, v in run_meta["config"].items()
            if k not in _RESUME_FREE_FIELDS and saved_cfg.get(k) != v
        }
    )
    if mismatched:
        raise ValueError(
            f"linear probe: {workdir} holds checkpoints of a different run ({mismatched} as "
            "(saved, requested)); use a fresh workdir or the original settings and data."
        )


def run_linear_probe(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    *,
    num_classes: int,
    config: LinearProbeConfig | None = None,
    mesh: jax.sharding.Mesh | None = None,
    workdir: str | None = None,
    progress: bool = True,
    feature_fn: Callable | None = None,
    feature_params: Any = None,
    return_state: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict[str, Any]:
    """Train a linear probe on frozen features and evaluate it.

    Args:
      train_features, test_features: cached features [N, D] (numpy or any array supporting
        integer-array indexing, e.g. np.memmap); with `feature_fn`, uint8 images [N, H, W, C] instead.
      train_labels, test_labels: int labels [N] in [0, num_classes).
      config: hyper-parameters (default: the BoB recipe, 90 epochs).
      mesh: device mesh (default: all devices on one "data" axis).
      workdir: checkpoints (`<workdir>/checkpoints`) and `<workdir>/metrics.jsonl`. If it already holds
        a checkpoint of the same config, training resumes from the latest one. None: no checkpoints.
      progress: show a rich progress bar.
      feature_fn: `feature_fn(images)` or, with `feature_params`, `feature_fn(feature_params, images)`
        -> [B, D]; a traceable function of a frozen backbone, run inside the jitted step.
      return_state: also return the final head state under "head_state" (host numpy nnx.State).
      on_step: called as `on_step(step, metrics)` after each train step (host side, for hooks/tests).

    Returns:
      dict with top1, top5 (num_classes >= 5), nll, ece, num_eval, train_loss_final (mean loss over the
      last epoch), steps, lr.
    """
    config = config or LinearProbeConfig()
    mesh = mesh or parallel.make_mesh()
    train_labels = _check_arrays("train", train_features, train_labels, num_classes, feature_fn)
    test_labels = _check_arrays("test", test_features, test_labels, num_classes, feature_fn)
    shards = parallel.num_data_shards(mesh)
    eval_batch_size = config.eval_batch_size or config.batch_size
    for what, bs in (("batch_size", config.batch_size), ("eval_batch_size", eval_batch_size)):
        if bs % shards:
            raise ValueError(
                f"linear probe: {what}={bs} is not divisible by the {shards} data shards of the mesh; "
                f"use a multiple of {shards}."
            )

    # In-features: from the cached array, or by tracing feature_fn on one example.
    if feature_fn is None:
        in_features = int(np.shape(train_features)[1])
    else:
        example = jax.ShapeDtypeStruct(
            (shards,) + tuple(np.shape(train_features)[1:]), np.asarray(train_features[:1]).dtype
        )
        fn = feature_fn if feature_params is None else functools.partial(feature_fn, feature_params)
        out = jax.eval_shape(fn, example)
        if len(out.shape) != 2:
            raise ValueError(f"linear probe: feature_fn must return [B, D], got shape {out.shape}.")
        in_features = int(out.shape[1])

    batches = StepBatches(
        train_features, train_labels, batch_size=config.batch_size, epochs=config.epochs, seed=config.seed
    )
    steps_per_epoch = batches.steps_per_epoch
    total_steps = steps_per_epoch * config.epochs

    tx = make_optimizer(config, steps_per_epoch)
    rep = parallel.replicated(mesh)
    graphdef, state = create_train_state(config, in_features, num_classes, tx, mesh)
    feature_params = jax.device_put(feature_params, rep) if feature_params is not None else None
    train_step = make_train_step(
        graphdef, tx, mesh, steps_per_epoch, feature_fn, make_schedule(config, steps_per_epoch)
    )
    eval_step = make_eval_step(graphdef, mesh, feature_fn)

    run_meta = {
        "task": "linear_probe",
        "config": dataclasses.asdict(config),
        "num_classes": int(num_classes),
        "in_features": in_features,
        "num_train": int(len(train_labels)),
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "train_fingerprint": _fingerprint(train_features, train_labels),
    }

    ckpt = writer = None
    data_state = None
    if workdir is not None:
        from bob_jax.checkpoint import Checkpointer, abstract_like
        from bob_jax.metrics_log import MetricsWriter

        # Synchronous saves: the state buffers are donated to the next step, so the save must have
        # copied them out before returning; head checkpoints are small.
        ckpt = Checkpointer(
            os.path.join(workdir, "checkpoints"), max_to_keep=2, save_interval_steps=1, async_save=False
        )
        latest = ckpt.latest_step()
        if latest is not None:
            try:
                _check_same_run(ckpt.metadata(latest), run_meta, workdir)
                state, data_state = ckpt.restore(latest, abstract_like(state))
            except BaseException:
                ckpt.close()
                raise
        writer = MetricsWriter(workdir)

    start_step = int(jax.device_get(state["step"]))
    it = train_iterator(batches, data_state)
    if isinstance(data_state, dict) and data_state.get("next_index", start_step) != start_step:
        raise RuntimeError(
            f"linear probe: checkpoint data state {data_state} does not match the restored step {start_step}."
        )
    bar = _Progress(total_steps, start_step, enabled=progress)
    every = config.checkpoint_every_steps or steps_per_epoch
    metrics = None
    t0 = time.time()
    try:
        for step in range(start_step, total_steps):
            batch = parallel.shard_batch(next(it), mesh)
            state, metrics = train_step(state, batch, feature_params)
            done = step + 1
            if on_step is not None:
                on_step(done, metrics)
            if done % config.log_every_steps == 0 or done == total_steps:
                loss = float(metrics["loss"])
                if not math.isfinite(loss):
                    raise FloatingPointError(f"linear probe: loss became {loss} at step {done}.")
                lr = float(metrics["lr"])
                if writer is not None:
                    writer.write(
                        done, {"train/loss": loss, "train/lr": lr, "train/epoch": done / steps_per_epoch}
                    )
                bar.update(done, f"loss {loss:.4f} lr {lr:.3g}")
            if ckpt is not None and (done % every == 0 or done == total_steps):
                ckpt.save(done, state, it.get_state(), run_meta, force=True)
        bar.close()
        result = evaluate(
            eval_step,
            state["params"],
            state["batch_stats"],
            test_features,
            test_labels,
            batch_size=eval_batch_size,
            mesh=mesh,
            num_classes=num_classes,
            feature_params=feature_params,
        )
        result["train_loss_final"] = float(jax.device_get(state["epoch_loss_sum"])) / steps_per_epoch
        result["steps"] = total_steps
        result["lr"] = config.lr
        result["train_seconds"] = time.time() - t0
        if writer is not None:
            writer.write(
                total_steps, {f"eval/{k}": v for k, v in result.items() if isinstance(v, int | float)}
            )
        if return_state:
            result["head_state"] = jax.device_get(nnx.merge_state(state["params"], state["batch_stats"]))
        return result
    finally:
        bar.close()
        if hasattr(it, "close"):
            it.close()  # stop grain's prefetch threads
        if ckpt is not None:
            ckpt.close()
        if writer is not None:
            writer.close()


class _Progress:
    """rich progress bar that does nothing when disabled or when rich is missing."""

    def __init__(self, total: int, completed: int, *, enabled: bool):
        self._progress = None
        if not enabled or jax.process_index() != 0:
            return
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        except ImportError:
            return
        self._progress = Progress(
            TextColumn("linear probe"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
        )
        self._task = self._progress.add_task("", total=total, completed=completed)
        self._progress.start()

    def update(self, completed: int, description: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, description=description)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def head_logits_numpy(
    head_state: Mapping[str, Any], features: np.ndarray, *, eps: float = 1e-6
) -> np.ndarray:
    """Reference (numpy, float64) eval-mode forward of a trained head, for checks and debugging."""
    pure = nnx.to_pure_dict(head_state) if isinstance(head_state, nnx.State) else head_state
    x = np.asarray(features, np.float64)
    if pure.get("bn"):
        x = (x - np.asarray(pure["bn"]["mean"], np.float64)) / np.sqrt(
            np.asarray(pure["bn"]["var"], np.float64) + eps
        )
    return x @ np.asarray(pure["fc"]["kernel"], np.float64) + np.asarray(pure["fc"]["bias"], np.float64)
