"""Test set-up: CPU only, 8 simulated devices, exact float32 matmuls, absl flags parsed.

Set BOB_JAX_REQUIRE_REFERENCE=1 (CI does) to turn a missing torch/timm into a failure instead of a
skip, so a broken install can never pass silently.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TIMM_FUSED_ATTN", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

from bob_jax.testing.reference import require_reference  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
_cache = os.environ.get("BOB_JAX_TEST_COMPILATION_CACHE")
if _cache:
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_configure(config):
    # grain reads an absl flag in multi-worker loaders; outside absl.app.run flags are unparsed
    # (google/grain#1355).
    from absl import flags

    flags.FLAGS.mark_as_parsed()


@pytest.fixture
def reference():
    return require_reference()
