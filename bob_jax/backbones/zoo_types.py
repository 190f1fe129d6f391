"""Zoo record types: a pretrained tag's preprocessing and where its weights come from."""

from __future__ import annotations

import dataclasses

from bob_jax.backbones.preprocess import Preprocess


@dataclasses.dataclass(frozen=True)
class HubWeights:
    """A timm checkpoint on the Hugging Face hub (`timm/<arch>.<tag>`)."""

    repo: str


@dataclasses.dataclass(frozen=True)
class PackageWeights:
    """A checkpoint file shipped inside an installed Python package (found without importing it)."""

    package: str  # import name
    distribution: str  # pip name, for the error message
    relative_path: str
    sha256_prefix: str = ""  # torch-hub style name suffix, checked when present


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    arch: str
    tag: str
    preprocess: Preprocess
    weights: HubWeights | PackageWeights
    num_classes: int = 1000
    license: str = ""
    notes: str = ""

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}"
