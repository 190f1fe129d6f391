"""`Family`: how to build, randomly initialise and convert the architectures of one timm family.

Each family is declared in its own module `bob_jax/families/<name>.py` as `FAMILY = Family(...)`,
with its pretrained tags (`entries`); `bob_jax.backbones.zoo` discovers them all. Adding a family =
a model file in `bob_jax/models/`, a key table in `bob_jax/convert/`, a module in
`bob_jax/families/` and a parity test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from bob_jax.backbones.zoo_types import ZooEntry
from bob_jax.convert import Rule
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
    entries: Sequence[ZooEntry] = ()  # pretrained tags: preprocessing and weight source
    # timm's checkpoint_filter_fn step that depends on the target config (e.g. resampling a position
    # embedding to the model's grid): adapt(state_dict, cfg) -> state_dict, after foreign layouts.
    adapt: Callable[[Mapping[str, np.ndarray], Any], Mapping[str, np.ndarray]] | None = None
    # Layer-wise lr decay (timm `param_groups_layer_decay` over `group_matcher(coarse=False)`):
    # layer_id(dotted NNX param path, cfg) -> id in [0, num_layers(cfg)); the head is the last id.
    layer_id: Callable[[str, Any], int] | None = None
    num_layers: Callable[[Any], int] | None = None

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
