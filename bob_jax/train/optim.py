"""Optimisers and learning-rate schedules used by the BoB training recipes.

LARS follows MAE's linear-probing optimiser (facebookresearch/mae, `util/lars.py`), which BoB's
linear probe uses unchanged:

    for each parameter p with gradient g:
        if p.ndim > 1:                      # weights only; biases and norm parameters are exempt
            g = g + weight_decay * p
            q = trust_coefficient * ||p|| / ||g||   (q = 1 when ||p|| == 0 or ||g|| == 0)
            g = q * g
        mu = momentum * mu + g
        p = p - lr * mu

`mae_lars` builds exactly this from optax primitives (the same ones `optax.lars` chains). The order
matters: MAE accumulates the momentum of the *unscaled* update and multiplies by the *current* lr,
while `optax.lars` scales by the lr before the momentum trace, i.e. it accumulates `lr_t * g_t`. The
two agree for a constant lr but differ under warmup/cosine schedules, so `mae_lars` puts the trace
before the lr scaling. `optax_lars` (optax.lars with the MAE masks) is kept for comparison.

Schedules: MAE adjusts the lr every iteration with a fractional epoch; in steps that is
`warmup_cosine` below (linear warmup from 0, then half-cosine to `end_lr`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def weight_matrix_mask(params: Any) -> Any:
    """True for parameters with ndim > 1 (weights), False for biases / norm scales (MAE's rule)."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def mae_lars(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
) -> optax.GradientTransformation:
    """LARS exactly as MAE's `util/lars.py` (see the module docstring), as an optax transformation."""
    if momentum < 0:
        raise ValueError(f"mae_lars: momentum must be >= 0, got {momentum}.")
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=weight_matrix_mask),
        optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), weight_matrix_mask),
        # Momentum of the lr-free update, then the current lr: p -= lr_t * mu_t (MAE/torch order).
        optax.trace(decay=momentum, nesterov=False),
        optax.scale_by_learning_rate(learning_rate),
    )


def optax_lars(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
) -> optax.GradientTransformation:
    """`optax.lars` with MAE's masks. Equals `mae_lars` only for a constant learning rate."""
    return optax.lars(
        learning_rate,
        weight_decay=weight_decay,
        weight_decay_mask=weight_matrix_mask,
        trust_coefficient=trust_coefficient,
        trust_ratio_mask=weight_matrix_mask,
        momentum=momentum,
    )


def scaled_lr(base_lr: float, effective_batch_size: int) -> float:
    """Absolute lr = base_lr * effective batch / 256 (the MAE/BoB linear-scaling rule)."""
    if effective_batch_size <= 0:
        raise ValueError(f"scaled_lr: effective batch size must be positive, got {effective_batch_size}.")
    return base_lr * effective_batch_size / 256.0


def warmup_cosine(
    base_lr: float, total_steps: int, warmup_steps: int, end_lr: float = 0.0
) -> Callable[[jax.Array | int], jax.Array]:
    """Per-step schedule: linear warmup from 0 to `base_lr`, then half-cosine down to `end_lr`.

    Identical to MAE's `adjust_learning_rate` evaluated at epoch = step / steps_per_epoch:
      step <  warmup: base * step / warmup
      step >= warmup: end + (base - end) * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))
    """
    if total_steps <= 0:
        raise ValueError(f"warmup_cosine: total_steps must be positive, got {total_steps}.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_cosine: warmup_steps={warmup_steps} must lie in [0, total_steps={total_steps}]."
        )

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = base_lr * step / max(warmup_steps, 1)
        decay_len = max(total_steps - warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / decay_len, 0.0, 1.0)
        cos = end_lr + (base_lr - end_lr) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup_steps, warm, cos)

    return schedule
