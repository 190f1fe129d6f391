"""Swin Transformer v1 (timm `swin_transformer.py`): model, timm random init, key table and tags."""

from bob_jax.backbones.family import Family
from bob_jax.backbones.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from bob_jax.backbones.zoo_types import HubWeights, ZooEntry
from bob_jax.convert import swin as convert
from bob_jax.models import swin

# timm pretrained_cfg of these tags: 224, crop 0.9, bicubic, ImageNet mean/std (fixed_input_size).
_PRE = Preprocess(224, 0.9, "bicubic", IMAGENET_MEAN, IMAGENET_STD)


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
    entries=(
        _e("swin_tiny_patch4_window7_224", "ms_in1k",
           notes="timm's default swin_tiny (original IN-1k weights)"),
        _e("swin_base_patch4_window7_224", "ms_in22k_ft_in1k",
           notes="timm's default swin_base (IN-22k -> 1k)"),
        _e("swin_base_patch4_window7_224", "ms_in1k", notes="original IN-1k-only Swin-B"),
    ),
)
