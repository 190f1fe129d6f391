"""Swin Transformer V2 (timm `swin_transformer_v2.py`): model, timm random init, key table and tags.

The MiDaS v3.1 depth encoders are not hosted by timm: their DPT checkpoints (URLs below) hold the
whole timm 0.6 SwinV2 under `pretrained.model.` in the stage-end layout; `convert.midas_dpt_to_timm`
keeps that encoder and drops the DPT neck/head. They load from a local path:
create("swinv2_tiny_window16_256.midas_v31", weights="dpt_swin2_tiny_256.pt"). Their `head.fc` is the
ImageNet classifier the encoder started from (untouched by the depth training, so no longer matched
to the fine-tuned encoder): pass num_classes=0 to drop it.
"""


from bob_jax.backbones.family import Family
from bob_jax.backbones.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    Preprocess,
)
from bob_jax.backbones.zoo_types import HubWeights, UrlWeights, ZooEntry
from bob_jax.convert import swin as convert
from bob_jax.families.swin import layer_id, num_layers
from bob_jax.models import swinv2


# timm pretrained_cfg: 256 px crop 0.9, 384 px crop 1.0; bicubic; ImageNet mean/std.
_256 = Preprocess(256, 0.9, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
_384 = Preprocess(384, 1.0, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
# MiDaS run.py for dpt_swin2_*: resize (keep aspect, multiple of 32, cv2 INTER_CUBIC) to the net size,
# NormalizeImage(mean=0.5, std=0.5); expressed here as a full-image bicubic resize (crop 1.0).
_MIDAS_256 = Preprocess(256, 1.0, "bicubic", INCEPTION_MEAN, INCEPTION_STD)
_MIDAS_384 = Preprocess(384, 1.0, "bicubic", INCEPTION_MEAN, INCEPTION_STD)
MIDAS_URL = "https://github.com/isl-org/MiDaS/releases/download/v3_1/{}"


def _e(arch, tag, pre, notes=""):
    return ZooEntry(arch, tag, pre, HubWeights(f"timm/{arch}.{tag}"), license="mit", notes=notes)


FAMILY = Family(
    name="swinv2",
    archs=swinv2.ARCHS,
    arch_kwargs=swinv2.ARCH_KWARGS,
    model=swinv2.SwinTransformerV2,
    init_rules=swinv2.init_rules,
    timm_rules=convert.TIMM_RULES,
    head_prefixes=("head.",),
    foreign_layouts=convert.FOREIGN_LAYOUTS,
    layer_id=layer_id,
    num_layers=num_layers,
    entries=(
        _e("swinv2_tiny_window8_256", "ms_in1k", _256),
        _e("swinv2_base_window8_256", "ms_in1k", _256),
        _e("swinv2_base_window12to16_192to256", "ms_in22k_ft_in1k", _256,
           notes="pretrained_window_sizes (12, 12, 12, 6)"),
        _e("swinv2_base_window12to24_192to384", "ms_in22k_ft_in1k", _384,
           notes="pretrained_window_sizes (12, 12, 12, 6)"),
        _e("swinv2_large_window12to16_192to256", "ms_in22k_ft_in1k", _256,
           notes="pretrained_window_sizes (12, 12, 12, 6)"),
        _e("swinv2_large_window12to24_192to384", "ms_in22k_ft_in1k", _384,
           notes="pretrained_window_sizes (12, 12, 12, 6)"),
        ZooEntry("swinv2_tiny_window16_256", "midas_v31", _MIDAS_256,
                 UrlWeights(MIDAS_URL.format("dpt_swin2_tiny_256.pt"), "dpt_swin2_tiny_256.pt"), license="mit",
                 notes="MiDaS v3.1 Swin2-T depth encoder (DPT head dropped)"),
        ZooEntry("swinv2_base_window12to24_192to384", "midas_v31", _MIDAS_384,
                 UrlWeights(MIDAS_URL.format("dpt_swin2_base_384.pt"), "dpt_swin2_base_384.pt"), license="mit",
                 notes="MiDaS v3.1 Swin2-B-384 depth encoder (DPT head dropped)"),
    ),
)
