"""DINOv2-style linear evaluation: a grid of linear heads trained together on frozen features.

The design of DINOv2's `dinov2/eval/linear.py` (porting.md section 13.1), written for cached features:

* Descriptor `DESCRIPTOR` (registered in `bob_jax.features.DESCRIPTORS` on import): per image the class
  tokens of the last four blocks, each through the model's final `norm`, then the mean of the last
  block's normalised patch tokens (register tokens excluded): [cls_{L-3}, cls_{L-2}, cls_{L-1}, cls_L,
  avgpool], 5 D values. DINOv2's head inputs (the last n in {1, 4} class tokens, optionally followed by
  that average, "avgpool") are each one contiguous column range of this vector, so a single extraction
  serves every variant. The norm is timm's `forward_intermediates(norm=True)`: the model's `norm`, which
  is absent (identity) for models with an `fc_norm` after pooling (global_pool='avg' ViTs, EVA-02's
  default).
* Heads: one `Linear(d_variant, C)` per (variant, learning rate), weights N(0, 0.01), zero bias. The
  learning rates are DINOv2's 13 base rates, each x batch / 256; SGD momentum 0.9 (torch: the buffer
  is mu * buf + grad, the step lr * buf), weight decay 0, cosine to 0 over all iterations (torch
  `CosineAnnealingLR`, no warmup). The loss is the sum over heads of each head's mean cross-entropy,
  so each head gets exactly its own gradient: the heads of a variant are one stacked weight [K, d, C]
  and a single jitted step trains all heads.
* Selection: DINOv2 picks the head with the best top-1 on its validation set (ImageNet val, which is
  also its test set). Here a seeded, stratified fraction of the training features (`val_fraction`) is
  held out, the heads train on the rest, the head with the best held-out top-1 (the first maximum in
  DINOv2's order: n, avgpool, lr) is chosen and scored on the test split: top-1, NLL and ECE.

Models without class tokens (CNNs, Swin) or with fewer than four blocks are read through their pooled
feature (`feature_output` returns "pooled"): a single variant, recorded as n_blocks 0 and avgpool 0,
under the same learning-rate grid.

Training length as DINOv2: `epochs` x `epoch_length` iterations (10 x 1250; an "epoch" is a number of
iterations, the sampler runs on through seeded per-pass permutations); `epoch_length=0` makes an epoch
one pass over the training part. The default global batch is DINOv2's 128 per GPU x 8 GPUs = 1024.

Differences from DINOv2: cached centre-crop features (no RandomResizedCrop + flip per iteration);
float32 features (DINOv2 extracts under fp16 autocast); the batch is min(batch_size, training examples)
rounded down to a multiple of the data shards, and the lr is scaled with that batch; no checkpoints (a
run on cached features is short).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bob_jax import parallel
from bob_jax.evaluate.calibration import calibration_metrics
from bob_jax.features import register_descriptor
from bob_jax.tasks.linear_probe import EpochBatchIndices

DESCRIPTOR = "dinov2_linear"
N_LAST_BLOCKS = 4  # class tokens stored per image by DESCRIPTOR
DINOV2_BASE_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


# --------------------------------------------------------------------------------------------------
# Descriptor
# --------------------------------------------------------------------------------------------------


def has_token_layout(model) -> bool:
    """True for transformers with a class token and at least `N_LAST_BLOCKS` blocks (ViT, EVA-02)."""
    blocks = getattr(model, "blocks", None)
    return (
        getattr(model, "cls_token", None) is not None
        and blocks is not None
        and len(blocks) >= N_LAST_BLOCKS
        and hasattr(model, "norm")
    )


def last_blocks_descriptor(model, images: jax.Array) -> jax.Array:
    """[B, 5 D]: normalised class tokens of the last four blocks, then the mean normalised patch token."""
    if not has_token_layout(model):
        raise ValueError(
            f"descriptor {DESCRIPTOR!r} needs a transformer with a class token and >= {N_LAST_BLOCKS} "
            f"blocks; {getattr(model, 'name', type(model).__name__)} is not one: use the output 'pooled'"
        )
    inter = model(images, intermediates=True)["intermediates"]
    depth = len(model.blocks)
    norm = model.norm if model.norm is not None else (lambda t: t)
    last = [inter[f"blocks.{i}"] for i in range(depth - N_LAST_BLOCKS, depth)]
    patch = norm(last[-1]["patch"])  # [B, h, w, D], registers already split off
    avgpool = jnp.mean(patch.reshape(patch.shape[0], -1, patch.shape[-1]), axis=1)
    return jnp.concatenate([norm(b["cls"]) for b in last] + [avgpool], axis=-1)


register_descriptor(DESCRIPTOR, last_blocks_descriptor)


def feature_output(model, cfg: Mapping[str, Any]) -> str:
    """The features the task reads for `model`: `DESCRIPTOR` for token models, else "pooled"."""
    return DESCRIPTOR if has_token_layout(model) else "pooled"


# --------------------------------------------------------------------------------------------------
# Config, variants, held-out split
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MultiHeadConfig:
    """DINOv2's grid, optimiser and length; `batch_size` is global and lr = base_lr * batch / 256.
    Iterations: epochs x epoch_length (epoch_length 0: one pass over the training part per epoch)."""

    base_lrs: tuple[float, ...] = DINOV2_BASE_LRS
    n_last_blocks: tuple[int, ...] = (1, 4)
    avgpool: tuple[bool, ...] = (False, True)
    epochs: int = 10
    epoch_length: int = 1250
    batch_size: int = 1024
    momentum: float = 0.9
    init_std: float = 0.01
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        for name in ("base_lrs", "n_last_blocks", "avgpool"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.base_lrs or min(self.base_lrs) <= 0:
            raise ValueError(
                f"linear_multihead: base_lrs must be positive learning rates, got {self.base_lrs}"
            )
        if not self.n_last_blocks or not set(self.n_last_blocks) <= set(range(1, N_LAST_BLOCKS + 1)):
            raise ValueError(
                f"linear_multihead: n_last_blocks must be values in 1..{N_LAST_BLOCKS} (the class tokens "
                f"stored by {DESCRIPTOR!r}), got {self.n_last_blocks}"
            )
        if not self.avgpool or not set(self.avgpool) <= {False, True}:
            raise ValueError(f"linear_multihead: avgpool must hold False and/or True, got {self.avgpool}")
        if self.epochs < 1 or self.batch_size < 1 or self.epoch_length < 0:
            raise ValueError(
                "linear_multihead: need epochs >= 1, batch_size >= 1 and epoch_length >= 0; got "
                f"{self.epochs}, {self.batch_size}, {self.epoch_length}"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"linear_multihead: val_fraction must lie in (0, 1), got {self.val_fraction}")


@dataclasses.dataclass(frozen=True)
class Variant:
    """A head input: columns [start, stop) of the stored features."""

    n_blocks: int  # 0: the pooled feature of a model without class tokens
    avgpool: bool
    start: int
    stop: int

    @property
    def name(self) -> str:
        return "pooled" if self.n_blocks == 0 else f"n={self.n_blocks},avgpool={int(self.avgpool)}"


def make_variants(output: str, dim: int, config: MultiHeadConfig) -> list[Variant]:
    """The head inputs for features of width `dim` produced by `output` (DINOv2's order: n, avgpool)."""
    if output != DESCRIPTOR:
        return [Variant(0, False, 0, dim)]
    if dim % (N_LAST_BLOCKS + 1):
        raise ValueError(
            f"linear_multihead: {DESCRIPTOR!r} features hold {N_LAST_BLOCKS} class tokens + avgpool, so "
            f"their width must be a multiple of {N_LAST_BLOCKS + 1}; got {dim}"
        )
    d = dim // (N_LAST_BLOCKS + 1)
    return [
        Variant(n, avg, (N_LAST_BLOCKS - n) * d, N_LAST_BLOCKS * d + (d if avg else 0))
        for n in config.n_last_blocks
        for avg in config.avgpool
    ]


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: round(fraction * n_c) random examples of each class c held out, at
    least one left for training; both sorted. Seeded by `seed` only (independent of the features)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = min(round(fraction * len(members)), len(members) - 1)
        held.append(rng.permutation(members)[:k])
    held = np.sort(np.concatenate(held)).astype(np.int64)
    if held.size == 0:
        raise ValueError(
            f"linear_multihead: val_fraction={fraction} holds out no example of the {len(labels)} training "
            "examples; raise val_fraction or use more training data"
        )
    return np.setdiff1d(np.arange(len(labels)), held), held


# --------------------------------------------------------------------------------------------------
# Heads: init, jitted train and eval steps
# --------------------------------------------------------------------------------------------------


def init_heads(
    variants: Sequence[Variant], num_lrs: int, num_classes: int, *, init_std: float, seed: int
) -> list[dict[str, np.ndarray]]:
    """Per variant {"w": [K, d, C] ~ N(0, init_std), "b": [K, C] zeros} (float32, host numpy: a seeded
    numpy draw costs nothing to compile); K = number of learning rates."""
    rng = np.random.default_rng(seed)
    return [
        {
            "w": (init_std * rng.standard_normal((num_lrs, v.stop - v.start, num_classes))).astype(
                np.float32
            ),
            "b": np.zeros((num_lrs, num_classes), np.float32),
        }
        for v in variants
    ]


def _logits(head: Mapping[str, jax.Array], x: jax.Array, v: Variant) -> jax.Array:
    """[K, B, C] logits of the K heads of variant `v` on features x [B, D]."""
    return jnp.einsum("bd,kdc->kbc", x[:, v.start : v.stop], head["w"]) + head["b"][:, None, :]


def make_train_step(
    variants: Sequence[Variant],
    lrs: Sequence[float],
    *,
    momentum: float,
    total_steps: int,
    mesh: jax.sharding.Mesh,
):
    """Jitted `step(state, x, y) -> state` for all heads; state = {params, momentum, step}, donated.

    Head k of every variant uses peak lr `lrs[k]` times the cosine factor 0.5 (1 + cos(pi t / T))."""
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    peak = jnp.asarray(lrs, jnp.float32)

    def loss_fn(params, x, y):
        total = 0.0
        for v, head in zip(variants, params, strict=True):
            logits = _logits(head, x, v)
            ce = optax.softmax_cross_entropy_with_integer_labels(
                logits, jnp.broadcast_to(y, logits.shape[:2])
            )
            total = total + jnp.sum(jnp.mean(ce, axis=1))  # sum over heads of each head's mean loss
        return total

    def step(state, x, y):
        grads = jax.grad(loss_fn)(state["params"], x, y)
        buf = jax.tree.map(lambda m, g: momentum * m + g, state["momentum"], grads)
        lr = peak * 0.5 * (1.0 + jnp.cos(math.pi * state["step"].astype(jnp.float32) / total_steps))
        params = jax.tree.map(
            lambda p, m: p - lr.reshape((-1,) + (1,) * (p.ndim - 1)) * m, state["params"], buf
        )
        return {"params": params, "momentum": buf, "step": state["step"] + 1}

    return jax.jit(step, in_shardings=(rep, data, data), out_shardings=rep, donate_argnums=(0,))


def _padded_batches(n: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices, mask) covering 0..n-1 once in fixed-size batches; the last is padded with index 0."""
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        yield np.where(idx < n, idx, 0), idx < n


def heads_accuracy(
    params,
    x: np.ndarray,
    y: np.ndarray,
    variants: Sequence[Variant],
    *,
    batch_size: int,
    mesh: jax.sharding.Mesh,
) -> np.ndarray:
    """Top-1 accuracy [num_variants, K] of every head on (x, y)."""
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)

    def correct(params, xb, yb, mask):
        return jnp.stack(
            [
                jnp.sum((jnp.argmax(_logits(h, xb, v), axis=-1) == yb) & mask, axis=1)
                for v, h in zip(variants, params, strict=True)
            ]
        )

    fn = jax.jit(correct, in_shardings=(rep, data, data, data), out_shardings=rep)
    total = 0
    for idx, mask in _padded_batches(len(y), batch_size):
        b = parallel.shard_global_batch({"x": x[idx], "y": y[idx].astype(np.int32), "mask": mask}, mesh)
        total = total + np.asarray(fn(params, b["x"], b["y"], b["mask"]), np.int64)
    return total / len(y)


def head_logits(
    head: Mapping[str, jax.Array],
    k: int,
    v: Variant,
    x: np.ndarray,
    *,
    batch_size: int,
    mesh: jax.sharding.Mesh,
) -> np.ndarray:
    """[N, C] float32 logits of head k of variant v."""
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    one = {"w": head["w"][k : k + 1], "b": head["b"][k : k + 1]}
    fn = jax.jit(lambda h, xb: _logits(h, xb, v)[0], in_shardings=(rep, data), out_shardings=rep)
    out = [
        np.asarray(fn(one, parallel.shard_global_batch({"x": x[idx]}, mesh)["x"]))[mask]
        for idx, mask in _padded_batches(len(x), batch_size)
    ]
    return np.concatenate(out).astype(np.float32)


def select_head(val_accuracy: np.ndarray) -> tuple[int, int]:
    """(variant, lr index) of the best held-out top-1; ties go to the first in (variant, lr) order, as
    DINOv2's strict `>` scan over its classifier dict does."""
    flat = int(np.argmax(np.asarray(val_accuracy).ravel()))  # argmax returns the first maximum
    return divmod(flat, np.shape(val_accuracy)[1])


def global_batch_size(requested: int, num_train: int, mesh: jax.sharding.Mesh) -> int:
    """min(requested, num_train) rounded down to a multiple of the data shards (drop_last batches)."""
    shards = parallel.num_data_shards(mesh)
    batch = min(requested, num_train) // shards * shards
    if batch < 1:
        raise ValueError(
            f"{num_train} training examples cannot fill one batch over {shards} data shards; use more "
            "training data or fewer devices"
        )
    return batch


def train_heads(
    params,
    x: np.ndarray,
    y: np.ndarray,
    variants: Sequence[Variant],
    lrs: Sequence[float],
    *,
    batch_size: int,
    steps: int,
    momentum: float,
    seed: int,
    mesh: jax.sharding.Mesh,
):
    """`steps` iterations of SGD + cosine for every head; batch t is batch t of the seeded per-pass
    permutations (`EpochBatchIndices`, drop_last), running through as many passes as needed."""
    sampler = EpochBatchIndices(len(y), batch_size, seed)
    if sampler.steps_per_epoch == 0 or steps < 1:
        raise ValueError(
            f"linear_multihead: {len(y)} training examples and batch {batch_size} give no step ({steps=})"
        )
    total = steps
    step = make_train_step(variants, lrs, momentum=momentum, total_steps=total, mesh=mesh)
    # Fresh replicated buffers (copy=True): the step donates its state, the caller keeps `params`.
    state = jax.jit(
        lambda p: {
            "params": jax.tree.map(lambda a: jnp.array(a, copy=True), p),
            "momentum": jax.tree.map(jnp.zeros_like, p),
            "step": jnp.zeros((), jnp.int32),
        },
        out_shardings=parallel.replicated(mesh),
    )(params)
    for t in range(total):
        idx = np.sort(sampler(t))  # the order inside a batch does not change the mean loss
        batch = parallel.shard_global_batch({"x": x[idx], "y": y[idx].astype(np.int32)}, mesh)
        state = step(state, batch["x"], batch["y"])
    return state["params"]


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def _lr_key(base_lr: float) -> str:
    return f"{base_lr:g}"


def run_linear_multihead(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    num_classes: int,
    output: str,
    config: MultiHeadConfig | None = None,
    mesh: jax.sharding.Mesh | None = None,
    workdir: str | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """Train the head grid on `train` minus a held-out part, choose on the held-out part, test the choice.

    `output` names what produced the features (`DESCRIPTOR` or a model output such as "pooled"), which
    fixes the variants. Returns (metrics, per-example 0/1 correctness of the chosen head on test).
    `workdir` (optional) receives `heads.json` (every head's held-out top-1, the choice) and
    `heldout_indices.npy` (positions in the training features).
    """
    config = config or MultiHeadConfig()
    mesh = mesh or parallel.make_mesh()
    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if x.ndim != 2 or y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"linear_multihead: {name} needs features [N, D] and integer labels [N]; got "
                f"{x.shape} and {y.dtype} {y.shape} (multi-label data: use multilabel_probe)"
            )
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(
                f"linear_multihead: {name} labels span [{y.min()}, {y.max()}], outside [0, {num_classes})"
            )
    variants = make_variants(output, train_x.shape[1], config)
    fit_idx, val_idx = stratified_holdout(train_y, config.val_fraction, config.seed)
    batch = global_batch_size(config.batch_size, len(fit_idx), mesh)
    lrs = [base * batch / 256.0 for base in config.base_lrs]  # DINOv2's scale_lr with the global batch
    steps = config.epochs * (config.epoch_length or len(fit_idx) // batch)
    params = init_heads(variants, len(lrs), num_classes, init_std=config.init_std, seed=config.seed)
    params = train_heads(
        params,
        train_x[fit_idx],
        train_y[fit_idx],
        variants,
        lrs,
        batch_size=batch,
        steps=steps,
        momentum=config.momentum,
        seed=config.seed,
        mesh=mesh,
    )
    eval_batch = max(batch, 256 // batch * batch)
    val_acc = heads_accuracy(
        params, train_x[val_idx], train_y[val_idx], variants, batch_size=eval_batch, mesh=mesh
    )
    vi, ki = select_head(val_acc)
    chosen = variants[vi]
    logits = head_logits(params[vi], ki, chosen, test_x, batch_size=eval_batch, mesh=mesh)
    metrics = calibration_metrics(logits, test_y)  # top1, nll, ece of the chosen head on test
    metrics.update(
        {
            "val_top1": float(val_acc[vi, ki]),
            "chosen_base_lr": float(config.base_lrs[ki]),
            "chosen_lr": float(lrs[ki]),
            "chosen_n_blocks": float(chosen.n_blocks),
            "chosen_avgpool": float(chosen.avgpool),
            "token_layout": float(output == DESCRIPTOR),
            "num_heads": float(len(variants) * len(lrs)),
            "num_train": float(len(fit_idx)),
            "num_val": float(len(val_idx)),
            "val_fraction": float(config.val_fraction),
            "split_seed": float(config.seed),
            "batch_size": float(batch),
            "steps": float(steps),
        }
    )
    for v, row in zip(variants, val_acc, strict=True):
        for base, acc in zip(config.base_lrs, row, strict=True):
            metrics[f"val_top1/{v.name},lr={_lr_key(base)}"] = float(acc)
    if workdir is not None:
        _write_record(pathlib.Path(workdir), variants, config, lrs, val_acc, (vi, ki), val_idx)
    correct = (np.argmax(logits, axis=1) == test_y).astype(np.float64)
    return metrics, correct


def _write_record(workdir: pathlib.Path, variants, config, lrs, val_acc, chosen, val_idx) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    heads = [
        {
            "n_blocks": v.n_blocks,
            "avgpool": v.avgpool,
            "columns": [v.start, v.stop],
            "base_lr": base,
            "lr": lr,
            "val_top1": float(val_acc[i, k]),
        }
        for i, v in enumerate(variants)
        for k, (base, lr) in enumerate(zip(config.base_lrs, lrs, strict=True))
    ]
    record = {
        "heads": heads,
        "chosen": heads[chosen[0] * len(lrs) + chosen[1]],
        "config": dataclasses.asdict(config),
        "num_val": len(val_idx),
    }
    (workdir / "heads.json").write_text(json.dumps(record, indent=1))
    np.save(workdir / "heldout_indices.npy", val_idx)
