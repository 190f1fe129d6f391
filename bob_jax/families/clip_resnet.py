"""OpenAI CLIP ResNets (timm `byobnet.py` `resnet*_clip`): model, timm init, key table and tags.

`num_classes` is the CLIP embedding width (`head.proj`): the logits are CLIP's image embedding,
`pooled` the attention pool's output before the projection. Preprocessing per tag is copied from
timm 1.0.31's pretrained_cfg (CLIP mean/std, bicubic, crop_pct 0.9, fixed input size).

Layer-wise lr decay uses timm's ByobNet group_matcher(coarse=False): `stem` is layer 0, every
bottleneck `stages.i.j` one layer, and the attention-pool head (q/k/v, pos_embed and the `proj`
classifier) the last layer; timm's `final_conv` (MATCH_PREV_GROUP) does not exist in CLIP ResNets.
"""

import re

from bob_jax.backbones.family import Family
from bob_jax.backbones.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
from bob_jax.backbones.zoo_types import HubWeights, ZooEntry
from bob_jax.convert import clip_resnet as convert
from bob_jax.models import clip_resnet


def _e(arch, size, num_classes, notes):
    return ZooEntry(
        arch, "openai", Preprocess(size, 0.9, "bicubic", CLIP_MEAN, CLIP_STD), HubWeights(f"timm/{arch}.openai"),
        num_classes=num_classes, license="mit",
        notes=notes + "; OpenAI's original RN*.pt (`visual.*` keys) also loads via the renamer",
    )


def num_layers(cfg) -> int:
    """Stem, one layer per bottleneck, the attention-pool head (it always has q/k/v parameters)."""
    return sum(cfg.layers) + 2


def layer_id(path: str, cfg) -> int:
    if path.startswith("stem."):
        return 0
    m = re.match(r"stages\.(\d+)\.(\d+)\.", path)
    if m:
        stage, block = int(m.group(1)), int(m.group(2))
        return 1 + sum(cfg.layers[:stage]) + block
    return sum(cfg.layers) + 1


FAMILY = Family(
    name="clip_resnet",
    archs=clip_resnet.ARCHS,
    arch_kwargs=clip_resnet.ARCH_KWARGS,
    model=clip_resnet.ClipResNet,
    init_rules=clip_resnet.init_rules,
    timm_rules=convert.TIMM_RULES,
    head_prefixes=("head.proj.",),
    foreign_layouts=((convert.is_openai_layout, convert.openai_to_timm),),
    layer_id=layer_id,
    num_layers=num_layers,
    entries=(
        _e("resnet50_clip", 224, 1024, "OpenAI CLIP RN50 image tower"),
        _e("resnet101_clip", 224, 512, "OpenAI CLIP RN101 image tower"),
        _e("resnet50x64_clip", 448, 1024, "OpenAI CLIP RN50x64 image tower (448 px)"),
    ),
)
