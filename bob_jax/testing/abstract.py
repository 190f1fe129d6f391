"""Zoo models built on abstract shapes only, for structure and memory checks without drawing weights."""

from __future__ import annotations

from flax import nnx


def abstract_backbone(name: str, **kwargs) -> nnx.Module:
    """`backbones.create(name, **kwargs)`'s module tree with `jax.ShapeDtypeStruct` leaves (no weights are
    drawn, so even a billion-parameter model is built in seconds); `.name` is set as `create` sets it."""
    from bob_jax.backbones import zoo
    from bob_jax.models.init import ShapeOnlyRngs

    entry = zoo.ZOO[name]
    family = zoo.ARCH_TO_FAMILY[entry.arch]
    cfg = family.config(entry.arch, {**entry.default_kwargs(), **kwargs})
    model = nnx.eval_shape(lambda: family.model(cfg, rngs=ShapeOnlyRngs()))
    model.name = name
    return model
