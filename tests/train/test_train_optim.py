"""LARS (MAE util/lars.py) and the warmup-cosine schedule against hand-written numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bob_jax.train import mae_lars, optax_lars, scaled_lr, warmup_cosine


def numpy_mae_lars(params, grads_seq, lrs, *, weight_decay, momentum=0.9, trust_coefficient=0.001):
    """Line-by-line port of facebookresearch/mae util/lars.py LARS.step() to numpy (float64)."""
    params = {k: v.astype(np.float64).copy() for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in params.items()}
    for grads, lr in zip(grads_seq, lrs, strict=True):
        for k, p in params.items():
            dp = grads[k].astype(np.float64)
            if p.ndim > 1:
                dp = dp + weight_decay * p
                param_norm = np.linalg.norm(p)
                update_norm = np.linalg.norm(dp)
                q = (
                    trust_coefficient * param_norm / update_norm
                    if param_norm > 0 and update_norm > 0
                    else 1.0
                )
                dp = dp * q
            mu[k] = momentum * mu[k] + dp
            params[k] = p - lr * mu[k]
    return params


def _problem(seed=0, steps=6):
    rng = np.random.default_rng(seed)
    params = {
        "w": rng.normal(size=(6, 4)).astype(np.float32),
        "b": rng.normal(size=(4,)).astype(np.float32),
        "z": np.zeros((3, 2), np.float32),  # zero norm -> trust ratio 1 (MAE's torch.where branch)
    }
    grads = [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(steps)
    ]
    return params, grads


def _run_optax(tx, params, grads_seq):
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    update = jax.jit(tx.update)
    for g in grads_seq:
        updates, state = update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)
    return jax.tree.map(np.asarray, p)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_mae_lars_matches_numpy_reference_with_schedule(weight_decay):
    params, grads = _problem()
    schedule = warmup_cosine(2.0, total_steps=len(grads), warmup_steps=2)
    lrs = [float(schedule(i)) for i in range(len(grads))]
    assert lrs[0] == 0.0 and len(set(lrs)) > 3  # a genuinely varying lr
    got = _run_optax(mae_lars(schedule, weight_decay=weight_decay), params, grads)
    want = numpy_mae_lars(params, grads, lrs, weight_decay=weight_decay)
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # The weights moved by a trust-ratio-scaled amount, the bias by the raw gradient: both changed.
    assert not np.allclose(got["w"], params["w"]) and not np.allclose(got["b"], params["b"])


def test_optax_lars_equals_mae_order_only_for_constant_lr():
    params, grads = _problem(seed=1)
    const = _run_optax(optax_lars(0.5, weight_decay=0.01), params, grads)
    want = numpy_mae_lars(params, grads, [0.5] * len(grads), weight_decay=0.01)
    for k in params:
        np.testing.assert_allclose(const[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # With a schedule optax.lars accumulates lr_t * g_t in the momentum: not MAE's update.
    schedule = warmup_cosine(2.0, total_steps=len(grads), warmup_steps=2)
    lrs = [float(schedule(i)) for i in range(len(grads))]
    sched = _run_optax(optax_lars(schedule), params, grads)
    want = numpy_mae_lars(params, grads, lrs, weight_decay=0.0)
    assert not np.allclose(sched["b"], want["b"], rtol=1e-4)


def mae_lr(base, end, epoch, warmup, epochs):
    """facebookresearch/mae util/lr_sched.adjust_learning_rate."""
    if epoch < warmup:
        return base * epoch / warmup
    return end + (base - end) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def test_warmup_cosine_matches_mae_per_iteration_schedule():
    steps_per_epoch, epochs, warmup = 7, 9, 2
    total = steps_per_epoch * epochs
    sched = warmup_cosine(0.8, total, warmup * steps_per_epoch, end_lr=1e-3)
    got = np.asarray(jax.vmap(sched)(jnp.arange(total)))
    want = [mae_lr(0.8, 1e-3, s / steps_per_epoch, warmup, epochs) for s in range(total)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # A few landmarks explicitly.
    w = warmup * steps_per_epoch
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(w // 2)), 0.8 * (w // 2) / w, rtol=1e-6)
    np.testing.assert_allclose(float(sched(w)), 0.8, rtol=1e-6)
    np.testing.assert_allclose(float(sched(w + (total - w) / 2)), (0.8 + 1e-3) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(sched(total)), 1e-3, rtol=1e-6)


def test_scaled_lr_and_schedule_validation():
    assert scaled_lr(0.1, 2048) == pytest.approx(0.8)
    assert scaled_lr(0.1, 256) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(0.1, 10, 11)
    with pytest.raises(ValueError, match="batch"):
        scaled_lr(0.1, 0)
