"""Declarative PyTorch -> Flax NNX key tables with strict accounting (see `core.py`)."""

from bob_jax.convert.core import (
    ConversionError,
    Rule,
    abstract_leaves,
    apply_rules,
    conv_weight,
    linear_weight,
    load_leaves,
    shape_stand_in,
)

__all__ = [
    "ConversionError",
    "Rule",
    "abstract_leaves",
    "apply_rules",
    "conv_weight",
    "linear_weight",
    "load_leaves",
    "shape_stand_in",
]
