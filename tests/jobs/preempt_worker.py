"""`python -m bob_jax.main` for the preemption tests, with a tiny model and an optional per-step delay.

Usage: python tests/jobs/preempt_worker.py [--step_sleep=SECONDS] <bob_jax.main flags...>

The job, the CLI and its exit status are the real ones; for speed the worker
  * builds every backbone at depth 2 (a ViT-S/16 at 32 px then has 4 patches and two blocks),
  * compiles with jax_disable_most_optimizations and exact float32 matmuls (every run compared in a test
    uses the same settings, so results can be compared bitwise),
  * with --step_sleep, sleeps before handing out each training batch, so a parent can signal the process
    mid-run. The sleep sits in the data iterator and changes no value, and its iterator state is grain's.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _tiny_backbones() -> None:
    from bob_jax import battle

    original = battle.input_size_kwargs

    def input_size_kwargs(name, config):
        return {**original(name, config), "depth": 2}

    battle.input_size_kwargs = input_size_kwargs


def _slow_steps(seconds: float) -> None:
    import time

    import grain

    from bob_jax.data import pipelines

    original = pipelines.train_dataset

    class Sleep(grain.transforms.Map):
        def map(self, batch):
            time.sleep(seconds)
            return batch

    def train_dataset(*args, **kwargs):
        return original(*args, **kwargs).map(Sleep())

    pipelines.train_dataset = train_dataset


def main() -> None:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_disable_most_optimizations", True)
    argv = sys.argv[1:]
    sleep = [a for a in argv if a.startswith("--step_sleep=")]
    argv = [a for a in argv if not a.startswith("--step_sleep=")]
    _tiny_backbones()
    if sleep:
        _slow_steps(float(sleep[-1].partition("=")[2]))
    from bob_jax import main as bob_main

    sys.argv = ["bob_jax.main", *argv]
    bob_main.run()


if __name__ == "__main__":
    main()
