"""Apply a regex key table to a PyTorch state dict and fill an abstract NNX model, strictly.

A table is an ordered tuple of `Rule(source_regex, target_template, transform)`; the first rule
whose regex fully matches a source key decides its fate (`target=None` drops it, e.g.
`num_batches_tracked`). Accounting is strict and complete: every source tensor must be consumed,
every target leaf filled exactly once, and every shape must agree after the transform. All
problems are collected and raised together in one `ConversionError`, so a broken checkpoint is
diagnosed in one run rather than one key at a time.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

Transform = Callable[[np.ndarray], np.ndarray]
_MAX_LISTED = 25


def conv_weight(w: np.ndarray) -> np.ndarray:
    """PyTorch conv `[O, I/groups, kh, kw]` -> Flax `[kh, kw, I/groups, O]`."""
    return np.transpose(w, (2, 3, 1, 0))


def linear_weight(w: np.ndarray) -> np.ndarray:
    """PyTorch Linear `[out, in]` -> Flax kernel `[in, out]`."""
    return np.transpose(w)


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str
    target: str | None
    transform: Transform | None = None

    def __post_init__(self):
        object.__setattr__(self, "_rx", re.compile(self.source))

    def apply(self, key: str) -> str | None | bool:
        """Target path for `key`, None to drop it, or False when the rule does not match."""
        m = self._rx.fullmatch(key)
        if m is None:
            return False
        return None if self.target is None else m.expand(self.target)


class ConversionError(ValueError):
    """A state dict does not fit the model; the message lists every problem found."""


def _listing(title: str, items: Sequence[str]) -> str:
    shown = list(items)[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


def apply_rules(
    state_dict: Mapping[str, np.ndarray],
    rules: Sequence[Rule],
    targets: Mapping[str, jax.ShapeDtypeStruct],
    *,
    source: str = "state dict",
    check_only: bool = False,
) -> dict[str, np.ndarray]:
    """Map `state_dict` through `rules` onto the leaves in `targets` (dotted path -> shape/dtype).

    `check_only=True` does the full key and shape accounting without copying any data (use it with
    `shape_stand_in` arrays to account a giant model in seconds)."""
    out: dict[str, np.ndarray] = {}
    producers: dict[str, str] = {}
    attempted: set[str] = set()  # targets some source key aimed at, filled or not
    unmatched, unknown, duplicated, misshapen = [], [], [], []
    for key in sorted(state_dict):
        target = False
        rule = None
        for rule in rules:
            target = rule.apply(key)
            if target is not False:
                break
        if target is False:
            unmatched.append(key)
            continue
        if target is None:
            continue
        if target not in targets:
            unknown.append(f"{key} -> {target}")
            continue
        attempted.add(target)
        if target in producers:
            duplicated.append(f"{target} <- {producers[target]} and {key}")
            continue
        value = np.asarray(state_dict[key])
        if rule.transform is not None:
            value = rule.transform(value)
        want = tuple(targets[target].shape)
        if tuple(value.shape) != want:
            misshapen.append(f"{key} -> {target}: source gives {tuple(value.shape)}, model needs {want}")
            continue
        producers[target] = key
        out[target] = value if check_only else value.astype(targets[target].dtype)
    missing = sorted(set(targets) - attempted)
    problems = []
    if unmatched:
        problems.append(_listing("source keys no rule accepts (unexpected)", unmatched))
    if unknown:
        problems.append(_listing("source keys mapped to paths the model does not have", unknown))
    if duplicated:
        problems.append(_listing("model parameters filled twice", duplicated))
    if misshapen:
        problems.append(_listing("shape mismatches", misshapen))
    if missing:
        problems.append(_listing("model parameters with no source tensor (missing)", missing))
    if problems:
        raise ConversionError(
            f"{source} does not fit the model ({len(state_dict)} source tensors, {len(targets)} "
            f"model leaves):\n" + "\n".join(problems) + "\nCheck that the checkpoint belongs to this "
            "architecture and variant (and pass key=... for nested checkpoints)."
        )
    return out


def shape_stand_in(shape, dtype=np.float32) -> np.ndarray:
    """A zero-stride array of `shape` that occupies one element of memory (for shape accounting)."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape=tuple(shape), strides=(0,) * len(shape))


def _path_str(path) -> str:
    return ".".join(str(p) for p in path)


def abstract_leaves(model: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    """Dotted path -> ShapeDtypeStruct (or array) for every variable of a (possibly abstract) model."""
    _, state = nnx.split(model)
    return {_path_str(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def load_leaves(model: nnx.Module, leaves: Mapping[str, jax.Array | np.ndarray]) -> nnx.Module:
    """A concrete model: the structure of `model` with every variable replaced from `leaves`.

    `leaves` must cover exactly the model's variables with matching shapes (ConversionError otherwise).
    """
    graphdef, state = nnx.split(model)
    flat = {_path_str(path): (path, var) for path, var in nnx.to_flat_state(state)}
    missing = sorted(set(flat) - set(leaves))
    unexpected = sorted(set(leaves) - set(flat))
    misshapen = [
        f"{k}: got {tuple(np.shape(leaves[k]))}, model needs {tuple(flat[k][1].get_value().shape)}"
        for k in sorted(set(flat) & set(leaves))
        if tuple(np.shape(leaves[k])) != tuple(flat[k][1].get_value().shape)
    ]
    problems = []
    if missing:
        problems.append(_listing("missing", missing))
    if unexpected:
        problems.append(_listing("unexpected", unexpected))
    if misshapen:
        problems.append(_listing("shape mismatches", misshapen))
    if problems:
        raise ConversionError("parameters do not fit the model:\n" + "\n".join(problems))
    for key, (path, var) in flat.items():
        var.set_value(jax.numpy.asarray(leaves[key], dtype=var.get_value().dtype))
    new_state = nnx.from_flat_state([(path, var) for path, var in flat.values()])
    return nnx.merge(graphdef, new_state)
