"""Vision Transformers (timm `vision_transformer.py`): ViT/AugReg, DeiT, DINO, MAE, CLIP towers, DINOv2.

Preprocessing per tag is copied from timm 1.0.31's pretrained_cfg (porting.md section 10). Notes:
AugReg uses mean = std = 0.5; CLIP ViT-L/14 laion2b uses 0.5/0.5 too (timm's cfg), the others CLIP
stats; OpenAI CLIP towers need the `*_clip_quickgelu_*` archs (QuickGELU); timm hosts their weights
under `timm/vit_*_clip_224.openai` (see `HubWeights.repo`). DINOv2 weights are stored for 518 px
(37x37 pos-embed grid); timm resamples the grid (bicubic, antialias) when a smaller `img_size` is built.
"""

import re

from bob_jax.backbones.family import Family
from bob_jax.backbones.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    Preprocess,
)
from bob_jax.backbones.zoo_types import HubWeights, UrlWeights, ZooEntry
from bob_jax.convert import vit as convert
from bob_jax.models import vit

_AUGREG = Preprocess(224, 0.9, "bicubic", INCEPTION_MEAN, INCEPTION_STD)
_IN = Preprocess(224, 0.9, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
_CLIP_09 = Preprocess(224, 0.9, "bicubic", CLIP_MEAN, CLIP_STD)
_CLIP_10 = Preprocess(224, 1.0, "bicubic", CLIP_MEAN, CLIP_STD)
_DINOV2 = Preprocess(518, 1.0, "bicubic", IMAGENET_MEAN, IMAGENET_STD)


def _e(arch, tag, pre, *, num_classes=1000, license="apache-2.0", repo=None, notes=""):
    return ZooEntry(arch, tag, pre, HubWeights(repo or f"timm/{arch}.{tag}"), num_classes=num_classes,
                    license=license, notes=notes)


_ENTRIES = [
    _e("vit_small_patch16_224", "augreg_in1k", _AUGREG),
    _e("vit_small_patch16_224", "augreg_in21k_ft_in1k", _AUGREG),
    _e("vit_base_patch16_224", "augreg_in1k", _AUGREG),
    _e("vit_base_patch16_224", "augreg_in21k_ft_in1k", _AUGREG),
    _e("vit_large_patch16_224", "augreg_in21k_ft_in1k", _AUGREG),
    _e("deit_small_patch16_224", "fb_in1k", _IN),
    _e("deit_base_patch16_224", "fb_in1k", _IN),
    _e("deit_base_patch16_384", "fb_in1k", Preprocess(384, 1.0, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
       notes="BoB detection's IN-1k ViT-B"),
    _e("vit_small_patch16_224", "dino", _IN, num_classes=0),
    _e("vit_base_patch16_224", "dino", _IN, num_classes=0),
    _e("vit_base_patch16_224", "mae", _IN, num_classes=0, license="cc-by-nc-4.0",
       notes="encoder only; pos_embed is a fixed sin-cos table stored as a tensor; BoB pools the cls token"),
    _e("vit_large_patch16_224", "mae", _IN, num_classes=0, license="cc-by-nc-4.0"),
    _e("vit_base_patch16_clip_224", "laion2b", _CLIP_10, num_classes=512,
       notes="head = CLIP visual projection (zero bias)"),
    _e("vit_large_patch14_clip_224", "laion2b",
       Preprocess(224, 1.0, "bicubic", INCEPTION_MEAN, INCEPTION_STD), num_classes=768,
       notes="head = CLIP visual projection; timm's cfg uses mean = std = 0.5 for this tag"),
    _e("vit_base_patch16_clip_quickgelu_224", "openai", _CLIP_09, num_classes=512,
       repo="timm/vit_base_patch16_clip_224.openai", notes="OpenAI CLIP ViT-B/16 image tower (QuickGELU)"),
    _e("vit_large_patch14_clip_quickgelu_224", "openai", _CLIP_10, num_classes=768,
       repo="timm/vit_large_patch14_clip_224.openai", notes="OpenAI CLIP ViT-L/14 image tower (QuickGELU)"),
]
for _size in ("small", "base", "large", "giant"):
    for _reg in ("", "_reg4"):
        _ENTRIES.append(_e(f"vit_{_size}_patch14{_reg}_dinov2", "lvd142m", _DINOV2, num_classes=0,
                           notes="stored for 518 px (37x37 pos-embed grid); other img_size values resample "
                                 "it like timm (bicubic, antialias), which differs from the official DINOv2 "
                                 "hub code for the register-free models"))

# MoCo v3 (facebookresearch/moco-v3 release files, `state_dict` entry, keys under `module.base_encoder.`):
# ViT-S has 12 heads (timm's ViT-S: 6) -- the weights cannot tell, so the entry fixes it. Eval transform
# of MoCo's linear probe: Resize(256) + CenterCrop(224), torchvision default (bilinear), ImageNet stats.
_MOCO = Preprocess(224, 0.875, "bilinear", IMAGENET_MEAN, IMAGENET_STD)
for _arch, _url, _kw in (
    ("vit_small_patch16_224", "https://dl.fbaipublicfiles.com/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar",
     (("num_heads", 12),)),
    ("vit_base_patch16_224", "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar", ()),
):
    _ENTRIES.append(ZooEntry(
        _arch, "mocov3", _MOCO, UrlWeights(_url, _url.rsplit("/", 1)[1], key="state_dict"), num_classes=0,
        license="cc-by-nc-4.0", arch_kwargs=_kw,
        notes="MoCo v3 300-epoch pre-training, base encoder (momentum encoder, projector, predictor "
              "dropped); pos_embed is a fixed 2-D sin-cos table stored in the checkpoint"))

def num_layers(cfg) -> int:
    """timm's ViT group_matcher: the embeddings, one group per block, then `fc_norm` / `head` (no group
    when neither exists, e.g. DINOv2 without classes)."""
    return cfg.depth + 1 + (cfg.use_fc_norm or cfg.num_classes > 0)


def layer_id(path: str, cfg) -> int:
    """Layer id of a dotted param path as timm assigns it: tokens, pos_embed, patch_embed and norm_pre
    are the stem; the final `norm` (MATCH_PREV_GROUP) shares the last block's id."""
    if re.match(r"cls_token|reg_token|pos_embed|patch_embed\.|norm_pre\.", path):
        return 0
    m = re.match(r"blocks\.(\d+)\.", path)
    if m:
        return 1 + int(m.group(1))
    if path.startswith("norm."):
        return cfg.depth
    return cfg.depth + 1


FAMILY = Family(
    name="vit",
    archs=vit.ARCHS,
    arch_kwargs=vit.ARCH_KWARGS,
    model=vit.VisionTransformer,
    init_rules=vit.init_rules,
    timm_rules=convert.TIMM_RULES,
    head_prefixes=("head.",),
    foreign_layouts=(
        (convert.is_mocov3, convert.mocov3_to_timm),
        (convert.is_dinov2, convert.dinov2_to_timm),
        (convert.is_openai_clip, convert.openai_clip_to_timm),
    ),
    entries=tuple(_ENTRIES),
    adapt=convert.resample_pos_embed,
    layer_id=layer_id,
    num_layers=num_layers,
)
