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
class UrlWeights:
    """A checkpoint timm does not host: the original release file, downloaded once into a cache.

    `sha256` (when known) is verified after download and on every use of the cached file.
    """

    url: str
    filename: str
    sha256: str = ""
    key: str | None = None  # sub-dict of a nested checkpoint (e.g. "state_dict")


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    arch: str
    tag: str
    preprocess: Preprocess
    weights: HubWeights | PackageWeights | UrlWeights
    num_classes: int = 1000
    license: str = ""
    notes: str = ""
    # timm.create_model kwargs this checkpoint needs (e.g. MoCo v3 ViT-S: (("num_heads", 12),)),
    # as a tuple of pairs so entries stay hashable; user kwargs override them.
    arch_kwargs: tuple[tuple[str, object], ...] = ()

    def default_kwargs(self) -> dict:
        return {"num_classes": self.num_classes, **dict(self.arch_kwargs)}

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}"
