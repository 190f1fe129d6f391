"""Architecture families: how to build, randomly initialise and convert each timm architecture.

Adding a family = a model file in `bob_jax/models/`, a key table in `bob_jax/convert/`, one
`Family` here, and its pretrained tags in `zoo.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from bob_jax.convert import Rule
from bob_jax.convert import efficientnet as effnet_convert
from bob_jax.convert import resnet as resnet_convert
from bob_jax.models import efficientnet, resnet
from bob_jax.models.init import InitFn


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    archs: Mapping[str, Callable[..., Any]]  # arch -> config factory(**arch_kwargs)
    arch_kwargs: tuple[str, ...]  # timm.create_model keyword arguments we implement
    model: Callable[..., nnx.Module]  # model(cfg, rngs=...)
    init_rules: Callable[[Any], Sequence[tuple[str, InitFn]]]
    timm_rules: Sequence[Rule]
    head_prefixes: tuple[str, ...]  # source keys of the classifier head (dropped when num_classes changes)
    # Renames other published layouts into timm keys; chosen by `detect(state_dict)`.
    foreign_layouts: Sequence[tuple[Callable[[Mapping[str, np.ndarray]], bool], Callable]] = ()

    def config(self, arch: str, arch_kwargs: Mapping[str, Any]):
        unknown = sorted(set(arch_kwargs) - set(self.arch_kwargs))
        if unknown:
            raise TypeError(
                f"{arch} does not support the keyword argument(s) {unknown}; supported: {list(self.arch_kwargs)}"
            )
        return self.archs[arch](**arch_kwargs)

    def to_timm_layout(self, state_dict: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        for detect, rename in self.foreign_layouts:
            if detect(state_dict):
                return rename(dict(state_dict))
        return state_dict


FAMILIES = (
    Family(
        name="resnet",
        archs=resnet.ARCHS,
        arch_kwargs=resnet.ARCH_KWARGS,
        model=resnet.ResNet,
        init_rules=resnet.init_rules,
        timm_rules=resnet_convert.TIMM_RULES,
        head_prefixes=("fc.",),
    ),
    Family(
        name="efficientnet",
        archs=efficientnet.ARCHS,
        arch_kwargs=efficientnet.ARCH_KWARGS,
        model=efficientnet.EfficientNet,
        init_rules=efficientnet.init_rules,
        timm_rules=effnet_convert.TIMM_RULES,
        head_prefixes=("classifier.",),
        foreign_layouts=(
            (lambda sd: "_conv_stem.weight" in sd, effnet_convert.effnet_pytorch_to_timm),
        ),
    ),
)

ARCH_TO_FAMILY = {arch: fam for fam in FAMILIES for arch in fam.archs}
