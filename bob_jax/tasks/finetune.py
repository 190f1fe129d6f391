"""End-to-end fine-tuning: BoB's classification fine-tuning recipe (bob-spec.md §3.1).

Source of the recipe: `bob-classification/train.py` (timm's training script with gradient
accumulation) and `model_configs/*_ft.yaml`:
  * AdamW (betas 0.9/0.999, eps 1e-8), lr 1e-3, weight decay 0.05, layer-wise lr decay 0.75 through
    timm's `param_groups_layer_decay` (layer ids from each model's `group_matcher(coarse=False)`;
    scale = decay ** (num_layers - 1 - layer_id); no weight decay for parameters with ndim <= 1).
  * cosine schedule with warm-up from 1e-4, min lr 1e-6; mixup 0.8 / cutmix 1.0 / switch 0.5, label
    smoothing 0.1 (soft-target cross-entropy), random erasing 0.25 (pixel); RandAugment; AMP.
  * the classifier head is replaced and re-initialised (`backbones.create(..., num_classes=K)`).

Implementation: the NNX model is put in train mode (BatchNorm uses batch statistics and updates its
running `mean` / `var`) and split once into `graphdef, params, rest`; the jitted step is a pure
function `(params, rest, opt_state, images, targets) -> (params, rest, opt_state, loss)` with the
batch sharded over the mesh's "data" axis and the state replicated. Layer decay and the weight-decay
mask are pytrees of the same structure as `params`.

Differences to the original worth knowing:
  * The lr schedule is evaluated per optimiser update (timm steps it once per epoch); the formula is
    timm's `CosineLRScheduler` with `warmup_prefix=False`: linear from `warmup_lr` during warm-up,
    then `min_lr + (lr - min_lr) * (1 + cos(pi * t / T)) / 2` with t counted from the first update.
  * BatchNorm statistics are computed over the global batch (the original used per-GPU statistics).
  * drop-path is not applied (the JAX models have no stochastic depth).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bob_jax import parallel

# --------------------------------------------------------------------------------------------------
# Layer-wise lr decay
# --------------------------------------------------------------------------------------------------


def _family_and_cfg(model: nnx.Module):
    from bob_jax.backbones import zoo

    name = getattr(model, "name", None)
    arch = name.split(".")[0] if isinstance(name, str) else None
    if arch not in zoo.ARCH_TO_FAMILY:
        raise ValueError(
            f"layer decay needs a model made by bob_jax.backbones.create (with .name 'arch.tag'), got name {name!r}"
        )
    family = zoo.ARCH_TO_FAMILY[arch]
    if family.layer_id is None or family.num_layers is None:
        raise ValueError(
            f"family {family.name!r} declares no layer_id/num_layers; layer decay is unavailable for {arch}. "
            "Use layer_decay=1.0 or add layer_id to the family module."
        )
    return family, model.cfg


def _path_str(path) -> str:
    """Dotted NNX path of a pytree key path; the Variable's own `.value` attribute key is dropped."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            continue
        parts.append(str(k.key if isinstance(k, jax.tree_util.DictKey) else getattr(k, "idx", k)))
    return ".".join(parts)


def layer_ids(model: nnx.Module, params: Any | None = None) -> Any:
    """Pytree like `nnx.state(model, nnx.Param)` holding each parameter's timm layer id (int)."""
    family, cfg = _family_and_cfg(model)
    params = nnx.state(model, nnx.Param) if params is None else params
    return jax.tree.map_with_path(lambda path, _: family.layer_id(_path_str(path), cfg), params)


def layer_decay_scales(model: nnx.Module, layer_decay: float, params: Any | None = None) -> Any:
    """Per-parameter lr multiplier: layer_decay ** (num_layers - 1 - layer_id) (timm)."""
    family, cfg = _family_and_cfg(model)
    n = family.num_layers(cfg)
    ids = layer_ids(model, params)
    return jax.tree.map(lambda i: float(layer_decay ** (n - 1 - i)), ids)


def weight_decay_mask(params: Any) -> Any:
    """True where weight decay applies: timm excludes every parameter with ndim <= 1 (biases, norms)."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


# --------------------------------------------------------------------------------------------------
# Optimiser
# --------------------------------------------------------------------------------------------------


def warmup_cosine_lr(
    lr: float, total_steps: int, warmup_steps: int, *, warmup_lr: float = 1e-4, min_lr: float = 1e-6
):
    """timm CosineLRScheduler (warmup_prefix=False) evaluated per update (see the module docstring)."""
    if total_steps <= 0:
        raise ValueError(f"warmup_cosine_lr: total_steps must be positive, got {total_steps}.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_cosine_lr: warmup_steps={warmup_steps} must lie in [0, {total_steps}].")

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        warm = warmup_lr + t * (lr - warmup_lr) / max(warmup_steps, 1)
        progress = jnp.clip(t / total_steps, 0.0, 1.0)
        cos = min_lr + 0.5 * (lr - min_lr) * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(t < warmup_steps, warm, cos)

    return schedule


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiply each update by a fixed per-parameter factor (the layer-decay lr scale)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(init, update)


def adamw_layer_decay(
    schedule: optax.ScalarOrSchedule,
    *,
    weight_decay: float,
    lr_scales: Any,
    decay_mask: Any,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    accumulation_steps: int = 1,
) -> optax.GradientTransformation:
    """torch AdamW with timm's per-group lr scale: p -= lr * scale * (adam(g) + wd * mask * p).

    torch applies the decoupled decay as p *= 1 - lr * scale * wd before the Adam step, which is the
    same as adding wd * p to the Adam direction before the lr scaling. `accumulation_steps > 1` wraps
    the chain in `optax.MultiSteps` (gradients averaged over k micro-batches, one update)."""
    tx = optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        scale_by_tree(lr_scales),
        optax.scale_by_learning_rate(schedule),
    )
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}.")
    if accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulation_steps)
    return tx


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """timm SoftTargetCrossEntropy: mean over the batch of -sum(target * log_softmax(logits))."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(-jnp.sum(targets * logp, axis=-1))
