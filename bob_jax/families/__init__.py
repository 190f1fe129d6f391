"""One module per architecture family, each declaring `FAMILY = Family(...)` with its zoo entries.

Modules here are discovered by `bob_jax.backbones.zoo`; a new family needs no edit elsewhere.
"""
