"""Shared fixtures of the detection tests."""

import jax
import pytest


@pytest.fixture(scope="module")
def fast_compile():
    """XLA:CPU's optimisation passes about double the compile time of the small detection modules and
    buy nothing for one step on tiny arrays; off for the module that asks, restored afterwards. Opt-in
    (`pytestmark = pytest.mark.usefixtures("fast_compile")`): the overfitting test keeps full optimisation."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)
