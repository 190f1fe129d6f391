"""Which checkpoint and normalisation each pool backbone uses per task: the `bob` and `consistent` sets.

The original evaluated "the same backbone" with different checkpoints and preprocessing per task
(bob-spec 5.1): the bare timm ViT names load AugReg IN-21k->1k weights in classification while retrieval
uses `*_augreg_in1k`; ResNet-50 is timm's A1 recipe in classification and retrieval but torchvision V1
in detection; detection uses DeiT (ViT-B from the 384 px checkpoint); ConvNeXt detection loads non-EMA
weights; the linear probe normalises every model with ImageNet mean/std.

* `bob`: reproduce those per-task choices, so results line up with the paper's.
* `consistent`: one checkpoint per backbone for every task, with its own preprocessing, so a ranking
  compares backbones rather than per-task checkpoint choices.

`POOL` maps a pool name (the backbone's identity in reports) to its per-task zoo names; `"*"` is the
default for tasks not listed. Tasks: the job's task names plus `detection`.
"""

from __future__ import annotations

from collections.abc import Mapping

CONFIG_SETS = ("bob", "consistent")

# pool name -> {task or "*": zoo name}. The "*" entry is the consistent set's checkpoint.
POOL: Mapping[str, Mapping[str, str]] = {
    "resnet50": {"*": "resnet50.a1_in1k", "detection": "resnet50.tv_in1k"},
    "resnet101": {"*": "resnet101.a1h_in1k", "detection": "resnet101.tv_in1k"},
    "resnet50_dino": {"*": "resnet50.dino"},
    "resnet50_vicreg": {"*": "resnet50.vicreg"},
    "resnet50_clip": {"*": "resnet50_clip.openai"},
    "resnet101_clip": {"*": "resnet101_clip.openai"},
    "convnext_tiny_in1k": {"*": "convnext_tiny.fb_in1k"},
    "convnext_base_in1k": {"*": "convnext_base.fb_in1k"},
    "convnext_base_in22k": {"*": "convnext_base.fb_in22k_ft_in1k", "retrieval": "convnext_base.fb_in22k"},
    "convnext_xlarge_vicregl": {"*": "convnext_xlarge.vicregl_alpha0p75"},
    "swin_tiny_in1k": {"*": "swin_tiny_patch4_window7_224.ms_in1k"},
    "swin_base_in1k": {"*": "swin_base_patch4_window7_224.ms_in1k"},
    "swinv2_tiny_in1k": {"*": "swinv2_tiny_window8_256.ms_in1k"},
    "swinv2_base_in1k": {"*": "swinv2_base_window8_256.ms_in1k"},
    "swinv2_base_in22k": {"*": "swinv2_base_window12to16_192to256.ms_in22k_ft_in1k"},
    "midas_swinv2_tiny": {"*": "swinv2_tiny_window16_256.midas_v31"},
    "midas_swinv2_base": {"*": "swinv2_base_window12to24_192to384.midas_v31"},
    "vit_small_in1k": {"*": "vit_small_patch16_224.augreg_in1k",
                       "linear_probe": "vit_small_patch16_224.augreg_in21k_ft_in1k",
                       "finetune": "vit_small_patch16_224.augreg_in21k_ft_in1k",
                       "ood": "vit_small_patch16_224.augreg_in21k_ft_in1k",
                       "detection": "deit_small_patch16_224.fb_in1k"},
    "vit_base_in1k": {"*": "vit_base_patch16_224.augreg_in1k",
                      "linear_probe": "vit_base_patch16_224.augreg_in21k_ft_in1k",
                      "finetune": "vit_base_patch16_224.augreg_in21k_ft_in1k",
                      "ood": "vit_base_patch16_224.augreg_in21k_ft_in1k",
                      "detection": "deit_base_patch16_384.fb_in1k"},
    "vit_small_dino": {"*": "vit_small_patch16_224.dino"},
    "vit_base_dino": {"*": "vit_base_patch16_224.dino"},
    "vit_base_mae": {"*": "vit_base_patch16_224.mae"},
    "vit_base_mocov3": {"*": "vit_base_patch16_224.mocov3"},
    "vit_base_clip_openai": {"*": "vit_base_patch16_clip_quickgelu_224.openai"},
    "vit_base_clip_laion2b": {"*": "vit_base_patch16_clip_224.laion2b"},
    "vit_large_clip_openai": {"*": "vit_large_patch14_clip_quickgelu_224.openai"},
    # bob_jax additions (not in the original pool).
    "dinov2_small": {"*": "vit_small_patch14_dinov2.lvd142m"},
    "dinov2_base": {"*": "vit_base_patch14_dinov2.lvd142m"},
    "eva02_small": {"*": "eva02_small_patch14_224.mim_in22k"},
    "eva02_base": {"*": "eva02_base_patch14_224.mim_in22k"},
    "efficientnet_lite0": {"*": "tf_efficientnet_lite0.in1k"},
}

# Normalisation per task in the `bob` set ("imagenet": fixed ImageNet mean/std; "backbone": its own).
BOB_NORMALIZATION = {"linear_probe": "imagenet", "retrieval": "imagenet"}


def checkpoint(pool_name: str, task: str, config_set: str) -> str:
    """The zoo name `pool_name` uses for `task` under `config_set`."""
    if config_set not in CONFIG_SETS:
        raise ValueError(f"config_set={config_set!r}: choose one of {CONFIG_SETS}")
    if pool_name not in POOL:
        raise ValueError(f"unknown pool backbone {pool_name!r}; known: {sorted(POOL)}")
    choices = POOL[pool_name]
    return choices.get(task, choices["*"]) if config_set == "bob" else choices["*"]


def normalization(task: str, config_set: str) -> str:
    if config_set not in CONFIG_SETS:
        raise ValueError(f"config_set={config_set!r}: choose one of {CONFIG_SETS}")
    return BOB_NORMALIZATION.get(task, "backbone") if config_set == "bob" else "backbone"
