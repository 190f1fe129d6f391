"""The checkpoint catalogue: `arch.tag` -> preprocessing and where the pretrained weights come from.

Tags are timm's pretrained tags (an untagged timm name silently picks some default weights), with
preprocessing copied from each tag's timm `pretrained_cfg` (porting.md section 10). Entries are
declared by the family modules in `bob_jax/families/`, discovered here.
"""

from __future__ import annotations

import importlib
import pkgutil

import bob_jax.families
from bob_jax.backbones.family import Family
from bob_jax.backbones.zoo_types import HubWeights, PackageWeights, ZooEntry

__all__ = ["ARCH_TO_FAMILY", "DEFAULT_PREPROCESS", "FAMILIES", "ZOO", "HubWeights", "PackageWeights", "ZooEntry"]


def _discover() -> tuple[Family, ...]:
    found = []
    for info in sorted(pkgutil.iter_modules(bob_jax.families.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"bob_jax.families.{info.name}")
        found.append(module.FAMILY)
    return tuple(found)


FAMILIES = _discover()
ARCH_TO_FAMILY = {arch: fam for fam in FAMILIES for arch in fam.archs}
ZOO = {e.name: e for fam in FAMILIES for e in fam.entries}
# Preprocessing for an untagged arch (a random-init or user-converted model): its first tag's.
DEFAULT_PREPROCESS: dict = {}
for _entry in ZOO.values():
    DEFAULT_PREPROCESS.setdefault(_entry.arch, _entry.preprocess)
