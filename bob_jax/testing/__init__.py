"""Helpers shared by the parity tests and the GPU check scripts (no torch import at module level)."""

from bob_jax.testing.parity import assert_parity, parity_error

__all__ = ["assert_parity", "parity_error"]
