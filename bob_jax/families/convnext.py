"""ConvNeXt (timm `convnext.py`): model, timm random init, key tables and pretrained tags.

The VICRegL ConvNeXt-XL is not hosted by timm: its official backbone file uses the original
ConvNeXt key layout, renamed to timm's by `convert.official_to_timm`. Its entry carries the arch
kwargs of VICRegL's network: no classifier and the final norm before the average pool
(`head_norm_first=True`); its blocks have no layer scale (loaded as gamma = 1).
"""

import re

from bob_jax.backbones.family import Family
from bob_jax.backbones.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from bob_jax.backbones.zoo_types import HubWeights, UrlWeights, ZooEntry
from bob_jax.convert import convnext as convert
from bob_jax.models import convnext


# timm pretrained_cfg of every fb_* tag: 224, crop 0.875, bicubic, ImageNet mean/std.
_FB = Preprocess(224, 0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
# VICRegL `MultiCropValDataTransform`: Resize(256, bicubic), CenterCrop(224), std 0.228 (sic) for red.
_VICREGL = Preprocess(224, 0.875, "bicubic", IMAGENET_MEAN, (0.228, 0.224, 0.225))
_IN22K = 21841


def _fb(arch, tag, num_classes=1000, notes=""):
    return ZooEntry(arch, tag, _FB, HubWeights(f"timm/{arch}.{tag}"), num_classes=num_classes,
                    license="apache-2.0", notes=notes)


def num_layers(cfg) -> int:
    """timm's ConvNeXt group_matcher(coarse=False): stem, one group per block, then the head (`head.norm`
    and `head.fc`; with head_norm_first and no classes the head has no parameters and no group)."""
    has_head = not cfg.head_norm_first or cfg.num_classes > 0
    return sum(cfg.depths) + 1 + has_head


def layer_id(path: str, cfg) -> int:
    """Layer id of a dotted param path as timm assigns it: a stage's downsample shares its first block's
    id; `norm_pre` carries timm's MATCH_PREV_GROUP suffix, so it shares the last block's id."""
    if path.startswith("stem."):
        return 0
    m = re.match(r"stages\.(\d+)\.(?:downsample|blocks\.(\d+))\.", path)
    if m:
        stage, block = int(m.group(1)), int(m.group(2) or 0)
        return 1 + sum(cfg.depths[:stage]) + block
    if path.startswith("norm_pre."):
        return sum(cfg.depths)
    return sum(cfg.depths) + 1


VICREGL_URL = "https://dl.fbaipublicfiles.com/vicregl/convnext_xlarge_alpha0.75.pth"

FAMILY = Family(
    name="convnext",
    archs=convnext.ARCHS,
    arch_kwargs=convnext.ARCH_KWARGS,
    model=convnext.ConvNeXt,
    init_rules=convnext.init_rules,
    timm_rules=convert.TIMM_RULES,
    head_prefixes=("head.fc.",),
    foreign_layouts=((convert.is_official_layout, convert.official_to_timm),),
    layer_id=layer_id,
    num_layers=num_layers,
    entries=(
        _fb("convnext_tiny", "fb_in1k", notes="EMA weights of the original IN-1k ConvNeXt-T"),
        _fb("convnext_small", "fb_in1k"),
        _fb("convnext_small", "fb_in22k_ft_in1k"),
        _fb("convnext_base", "fb_in1k"),
        _fb("convnext_base", "fb_in22k", num_classes=_IN22K, notes="IN-22k head (21841 classes)"),
        _fb("convnext_base", "fb_in22k_ft_in1k", notes="timm's default convnext_base"),
        _fb("convnext_xlarge", "fb_in22k", num_classes=_IN22K, notes="IN-22k head (21841 classes)"),
        _fb("convnext_xlarge", "fb_in22k_ft_in1k"),
        ZooEntry(
            "convnext_xlarge", "vicregl_alpha0p75", _VICREGL,
            UrlWeights(VICREGL_URL, "vicregl_convnext_xlarge_alpha0.75.pth"),
            num_classes=0, arch_kwargs=(("head_norm_first", True),), license="cc-by-nc",
            notes="VICRegL (alpha 0.75) self-supervised ConvNeXt-XL backbone (official release, "
                  "facebookresearch/VICRegL); pooled = mean of the final-normed map, as VICRegL's forward",
        ),
    ),
)
