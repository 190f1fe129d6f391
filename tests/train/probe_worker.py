"""Subprocess entry point for the SIGKILL-resume test of the linear probe.

Usage: python tests/train/probe_worker.py WORKDIR OUT_PREFIX [SLEEP_PER_STEP]
Trains a linear probe on a fixed tiny synthetic problem with checkpoints every 12 steps in WORKDIR
(resuming when it holds checkpoints) and writes OUT_PREFIX.json (metrics) + OUT_PREFIX.npz (head).
SLEEP_PER_STEP slows the loop down so that the parent can kill it mid-run.
"""

import json
import os
import sys
import time

import numpy as np

# One CPU device and exact matmuls, identical in every run so results can be compared bitwise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def synthetic_problem(n_train=384, n_test=100, dim=16, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)) * 2.0
    y = rng.integers(0, classes, n_train + n_test)
    x = (means[y] + rng.normal(size=(len(y), dim)) + 1.0).astype(np.float32)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def main(workdir: str, out_prefix: str, sleep: float = 0.0) -> None:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    # Halves the compile time of each worker; every run compared uses the same setting.
    jax.config.update("jax_disable_most_optimizations", True)
    from flax import nnx

    from bob_jax.tasks.linear_probe import LinearProbeConfig, run_linear_probe

    xtr, ytr, xte, yte = synthetic_problem()
    config = LinearProbeConfig(
        epochs=6,
        warmup_epochs=1,
        batch_size=32,
        base_lr=160.0,
        checkpoint_every_steps=12,
        log_every_steps=5,
        eval_batch_size=32,
    )

    def on_step(step, metrics):
        if sleep:
            time.sleep(sleep)

    result = run_linear_probe(
        xtr,
        ytr,
        xte,
        yte,
        num_classes=4,
        config=config,
        workdir=workdir,
        progress=False,
        return_state=True,
        on_step=on_step,
    )
    head = nnx.to_pure_dict(result.pop("head_state"))
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(head)[0]:
        flat["/".join(str(getattr(p, "key", p)) for p in path)] = np.asarray(leaf)
    np.savez(out_prefix + ".npz", **flat)
    result.pop("train_seconds")
    with open(out_prefix + ".json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
