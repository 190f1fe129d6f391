"""The checkpoint catalogue: `arch.tag` -> preprocessing and where the pretrained weights come from.

Tags are timm's pretrained tags (an untagged timm name silently picks some default weights), with
preprocessing copied from each tag's timm `pretrained_cfg` (porting.md section 10). Entries are
declared by the family modules in `bob_jax/families/`, discovered here.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

import bob_jax.families
from bob_jax.backbones.family import Family
from bob_jax.backbones.zoo_types import HubWeights, PackageWeights, ZooEntry

__all__ = ["ARCH_TO_FAMILY", "DEFAULT_PREPROCESS", "FAMILIES", "ZOO", "HubWeights", "PackageWeights", "ZooEntry"]


@functools.cache
def families() -> tuple[Family, ...]:
    """Every family module in `bob_jax/families/`, imported on first use (not at import time, so a
    family module can itself be imported first without a circular import)."""
    found = []
    for info in sorted(pkgutil.iter_modules(bob_jax.families.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"bob_jax.families.{info.name}")
        found.append(module.FAMILY)
    return tuple(found)


@functools.cache
def _tables() -> dict:
    fams = families()
    zoo = {e.name: e for fam in fams for e in fam.entries}
    default_preprocess: dict = {}
    for entry in zoo.values():
        # Preprocessing for an untagged arch (a random-init or user-converted model): its first tag's.
        default_preprocess.setdefault(entry.arch, entry.preprocess)
    return {
        "FAMILIES": fams,
        "ARCH_TO_FAMILY": {arch: fam for fam in fams for arch in fam.archs},
        "ZOO": zoo,
        "DEFAULT_PREPROCESS": default_preprocess,
    }


def __getattr__(name: str):
    if name in ("FAMILIES", "ARCH_TO_FAMILY", "ZOO", "DEFAULT_PREPROCESS"):
        return _tables()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
