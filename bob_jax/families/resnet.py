"""ResNet-50/101 (timm `resnet.py`): model, timm random init, key table and pretrained tags."""

from bob_jax.backbones.family import Family
from bob_jax.backbones.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from bob_jax.backbones.zoo_types import HubWeights, ZooEntry
from bob_jax.convert import resnet as convert
from bob_jax.models import resnet

_BICUBIC = dict(interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)
_BILINEAR = dict(interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD)

FAMILY = Family(
    name="resnet",
    archs=resnet.ARCHS,
    arch_kwargs=resnet.ARCH_KWARGS,
    model=resnet.ResNet,
    init_rules=resnet.init_rules,
    timm_rules=convert.TIMM_RULES,
    head_prefixes=("fc.",),
    entries=(
        ZooEntry("resnet50", "a1_in1k", Preprocess(224, 0.95, **_BICUBIC), HubWeights("timm/resnet50.a1_in1k"),
                 license="apache-2.0", notes="timm's default resnet50 (A1 recipe); the original's classification weights"),
        ZooEntry("resnet50", "tv_in1k", Preprocess(224, 0.875, **_BILINEAR), HubWeights("timm/resnet50.tv_in1k"),
                 license="bsd-3-clause", notes="torchvision V1 weights; the original's detection weights"),
        ZooEntry("resnet101", "a1h_in1k", Preprocess(224, 0.95, **_BICUBIC), HubWeights("timm/resnet101.a1h_in1k"),
                 license="apache-2.0", notes="timm's default resnet101"),
        ZooEntry("resnet101", "tv_in1k", Preprocess(224, 0.875, **_BILINEAR), HubWeights("timm/resnet101.tv_in1k"),
                 license="bsd-3-clause"),
    ),
)
