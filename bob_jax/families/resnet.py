"""ResNet-50/101 (timm `resnet.py`): model, timm random init, key table and pretrained tags."""

import re

from bob_jax.backbones.family import Family
from bob_jax.backbones.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from bob_jax.backbones.zoo_types import HubWeights, UrlWeights, ZooEntry
from bob_jax.convert import resnet as convert
from bob_jax.models import resnet

_BICUBIC = dict(interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)
_BILINEAR = dict(interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD)

_SSL_PREFIXES = ("module.", "backbone.")


def _is_prefixed(state_dict) -> bool:
    return any(k.startswith(_SSL_PREFIXES) for k in state_dict)


def _strip_prefixes(state_dict):
    """Official self-supervised releases (DINO, VICReg) keep torchvision names under a wrapper prefix."""
    out = {}
    for k, v in state_dict.items():
        for prefix in _SSL_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        out[k] = v
    return out


def num_layers(cfg) -> int:
    """timm's ResNet group_matcher(coarse=False): stem, one group per block, then the head (`fc`, only
    when num_classes > 0: timm numbers the groups of the parameters that exist)."""
    return sum(cfg.layers) + 1 + (cfg.num_classes > 0)


def layer_id(path: str, cfg) -> int:
    """Layer id of a dotted param path as timm assigns it (stem 0, block k -> k, unmatched -> last)."""
    if re.match(r"conv1|bn1", path):
        return 0
    m = re.match(r"layer(\d+)\.(\d+)\.", path)
    if m:
        stage, block = int(m.group(1)), int(m.group(2))
        return 1 + sum(cfg.layers[: stage - 1]) + block
    return sum(cfg.layers) + 1


FAMILY = Family(
    name="resnet",
    archs=resnet.ARCHS,
    arch_kwargs=resnet.ARCH_KWARGS,
    model=resnet.ResNet,
    init_rules=resnet.init_rules,
    timm_rules=convert.TIMM_RULES,
    head_prefixes=("fc.",),
    foreign_layouts=((_is_prefixed, _strip_prefixes),),
    layer_id=layer_id,
    num_layers=num_layers,
    entries=(
        ZooEntry("resnet50", "a1_in1k", Preprocess(224, 0.95, **_BICUBIC), HubWeights("timm/resnet50.a1_in1k"),
                 license="apache-2.0", notes="timm's default resnet50 (A1 recipe); the original's classification weights"),
        ZooEntry("resnet50", "tv_in1k", Preprocess(224, 0.875, **_BILINEAR), HubWeights("timm/resnet50.tv_in1k"),
                 license="bsd-3-clause", notes="torchvision V1 weights; the original's detection weights"),
        ZooEntry("resnet101", "a1h_in1k", Preprocess(224, 0.95, **_BICUBIC), HubWeights("timm/resnet101.a1h_in1k"),
                 license="apache-2.0", notes="timm's default resnet101"),
        ZooEntry("resnet101", "tv_in1k", Preprocess(224, 0.875, **_BILINEAR), HubWeights("timm/resnet101.tv_in1k"),
                 license="bsd-3-clause"),
        ZooEntry("resnet50", "dino", Preprocess(224, 0.875, **_BILINEAR),
                 UrlWeights("https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
                            "dino_resnet50_pretrain.pth"),
                 num_classes=0, license="apache-2.0", notes="DINO self-supervised ResNet-50 (official release)"),
        ZooEntry("resnet50", "vicreg", Preprocess(224, 0.875, **_BILINEAR),
                 UrlWeights("https://dl.fbaipublicfiles.com/vicreg/resnet50.pth", "vicreg_resnet50.pth"),
                 num_classes=0, license="mit", notes="VICReg self-supervised ResNet-50 (official release)"),
    ),
)
