"""Swin Transformer v1 (timm `swin_transformer.py`): model, timm random init, key table and tags.

`layer_id` / `num_layers` serve SwinV2 too: timm's two group matchers agree on our module tree.
"""

import re

from bob_jax.backbones.family import Family
from bob_jax.backbones.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from bob_jax.backbones.zoo_types import HubWeights, ZooEntry
from bob_jax.convert import swin as convert
from bob_jax.models import swin

# timm pretrained_cfg of these tags: 224, crop 0.9, bicubic, ImageNet mean/std (fixed_input_size).
_PRE = Preprocess(224, 0.9, "bicubic", IMAGENET_MEAN, IMAGENET_STD)


def num_layers(cfg) -> int:
    """timm's Swin group_matcher(coarse=False): patch_embed, one group per block, then `head.fc`
    (no group without classes)."""
    return sum(cfg.depths) + 1 + (cfg.num_classes > 0)


def layer_id(path: str, cfg) -> int:
    """Layer id of a dotted param path as timm assigns it: a stage's downsample (PatchMerging at the
    stage start) shares its first block's id; the final `norm` (MATCH_PREV_GROUP) the last block's."""
    if path.startswith("patch_embed."):
        return 0
    m = re.match(r"layers\.(\d+)\.(?:downsample|blocks\.(\d+))\.", path)
    if m:
        stage, block = int(m.group(1)), int(m.group(2) or 0)
        return 1 + sum(cfg.depths[:stage]) + block
    if path.startswith("norm."):
        return sum(cfg.depths)
    return sum(cfg.depths) + 1


def _e(arch, tag, notes=""):
    return ZooEntry(arch, tag, _PRE, HubWeights(f"timm/{arch}.{tag}"), license="mit", notes=notes)


FAMILY = Family(
    name="swin",
    archs=swin.ARCHS,
    arch_kwargs=swin.ARCH_KWARGS,
    model=swin.SwinTransformer,
    init_rules=swin.init_rules,
    timm_rules=convert.TIMM_RULES,
    head_prefixes=("head.",),
    foreign_layouts=convert.FOREIGN_LAYOUTS,
    adapt=convert.adapt_v1,
    layer_id=layer_id,
    num_layers=num_layers,
    entries=(
        _e("swin_tiny_patch4_window7_224", "ms_in1k",
           notes="timm's default swin_tiny (original IN-1k weights)"),
        _e("swin_base_patch4_window7_224", "ms_in22k_ft_in1k",
           notes="timm's default swin_base (IN-22k -> 1k)"),
        _e("swin_base_patch4_window7_224", "ms_in1k", notes="original IN-1k-only Swin-B"),
    ),
)
