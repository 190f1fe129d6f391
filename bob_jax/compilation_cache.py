"""The persistent XLA compilation cache the entry points (`bob_jax.main`, `bob_jax.sweep`) turn on: a rerun,
a resumed run or another shard of a sweep skips recompiling the same steps."""

from __future__ import annotations

import os

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "bob_jax", "xla")


def enable(directory: str) -> None:
    """Cache compiled programs in `directory` ('' leaves caching off). Compiles under a second are not
    worth a disk round trip."""
    if not directory:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
