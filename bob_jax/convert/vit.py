"""timm VisionTransformer state dict -> `bob_jax.models.vit.VisionTransformer` (near-identity table),
plus the other published layouts renamed into timm keys and timm's pos-embed resampling.

- MoCo v3 (`facebookresearch/moco-v3` `vit-{s,b}-300ep.pth.tar`, `state_dict` entry): keys under
  `module.base_encoder.`; `module.momentum_encoder.*`, `module.predictor.*` and the base encoder's
  projector MLP (`head.*`) are training-only and dropped. MoCo's ViT-S has 12 heads (num_heads=12),
  which the weights cannot reveal (same shapes as timm's 6-head ViT-S).
- DINOv2 (`facebookresearch/dinov2` hub files, `dinov2_vit*14[_reg4]_pretrain.pth`): timm
  `_convert_dinov2` -- drop `mask_token`, `w12`/`w3` -> `fc1`/`fc2`; with registers,
  `reg_token := register_tokens`, `cls_token := cls_token + pos_embed[:, 0]`, `pos_embed := pos_embed[:, 1:]`.
- OpenAI CLIP (`openai/CLIP` JIT/state-dict files, image tower under `visual.` or `module.visual.`):
  timm `_convert_openai_clip` -- renames, `proj [D, E]` -> `head.weight [E, D]` with a zero bias.
- `resample_pos_embed(state_dict, cfg)`: timm `checkpoint_filter_fn`'s pos-embed resampling (bicubic,
  antialias, align_corners=False) when the checkpoint's grid differs from the model's (DINOv2's 37x37
  grid for 518 px -> e.g. 16x16 for 224 px).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np

from bob_jax.convert.core import ConversionError, Rule, conv_weight, linear_weight
from bob_jax.models.pos_embed import resample_abs_pos_embed

_LINEAR = r"blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.fc[12])|head"
_NORM = r"norm_pre|norm|fc_norm|blocks\.\d+\.norm[12]"

TIMM_RULES = (
    Rule(r"(cls_token|reg_token|pos_embed)", r"\1"),
    Rule(r"patch_embed\.proj\.weight", "patch_embed.proj.kernel", conv_weight),
    Rule(r"patch_embed\.proj\.bias", "patch_embed.proj.bias"),
    Rule(rf"({_LINEAR})\.weight", r"\1.kernel", linear_weight),
    Rule(rf"({_LINEAR})\.bias", r"\1.bias"),
    Rule(rf"({_NORM})\.weight", r"\1.scale"),
    Rule(rf"({_NORM})\.bias", r"\1.bias"),
    Rule(r"(blocks\.\d+\.ls[12]\.gamma)", r"\1"),
)

MOCOV3_PREFIX = "module.base_encoder."


def is_mocov3(state_dict: Mapping[str, np.ndarray]) -> bool:
    return any(k.startswith(MOCOV3_PREFIX) for k in state_dict)


def mocov3_to_timm(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep the base encoder, strip its prefix, drop the projector head (`head.*`)."""
    out = {}
    for k, v in state_dict.items():
        if not k.startswith(MOCOV3_PREFIX):
            continue  # momentum encoder, predictor
        k = k[len(MOCOV3_PREFIX):]
        if k.startswith("head."):
            continue  # 3-layer projector MLP with BatchNorm: pre-training only
        out[k] = v
    return out


def is_dinov2(state_dict: Mapping[str, np.ndarray]) -> bool:
    return "mask_token" in state_dict


def dinov2_to_timm(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    sd = dict(state_dict)
    sd.pop("mask_token", None)
    out = {}
    if "register_tokens" in sd:
        out["reg_token"] = sd.pop("register_tokens")
        out["cls_token"] = np.asarray(sd.pop("cls_token")) + np.asarray(sd["pos_embed"])[:, 0]
        out["pos_embed"] = np.asarray(sd.pop("pos_embed"))[:, 1:]
    for k, v in sd.items():
        k = re.sub(r"^(blocks\.\d+\.mlp\.)w12\.", r"\1fc1.", k)
        out[re.sub(r"^(blocks\.\d+\.mlp\.)w3\.", r"\1fc2.", k)] = v
    return out


_OPENAI_SWAPS = (
    ("conv1", "patch_embed.proj"),
    ("positional_embedding", "pos_embed"),
    ("transformer.resblocks.", "blocks."),
    ("ln_pre", "norm_pre"),
    ("ln_post", "norm"),
    ("ln_", "norm"),
    ("in_proj_", "qkv."),
    ("out_proj", "proj"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)


def is_openai_clip(state_dict: Mapping[str, np.ndarray]) -> bool:
    return "visual.class_embedding" in state_dict or "module.visual.class_embedding" in state_dict


def openai_clip_to_timm(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The image tower only (text tower, logit_scale dropped), in timm `_convert_openai_clip`'s order."""
    prefix = "visual." if "visual.class_embedding" in state_dict else "module.visual."
    out = {}
    for k, v in state_dict.items():
        if not k.startswith(prefix):
            continue
        k = k.replace(prefix, "")
        for a, b in _OPENAI_SWAPS:
            k = k.replace(a, b)
        v = np.asarray(v)
        if k == "proj":
            k, v = "head.weight", v.T
            out["head.bias"] = np.zeros(v.shape[0], v.dtype)
        elif k == "class_embedding":
            k, v = "cls_token", v[None, None]
        elif k == "pos_embed":
            v = v[None]
        out[k] = v
    return out


def resample_pos_embed(state_dict: Mapping[str, np.ndarray], cfg) -> Mapping[str, np.ndarray]:
    """timm `checkpoint_filter_fn`: resample `pos_embed` to the grid of `cfg` (a ViTConfig) if needed.

    The old grid is taken as square (timm's `get_pretrained_grid_size` fallback for these models)."""
    v = state_dict.get("pos_embed")
    if v is None:
        return state_dict
    prefix = 0 if cfg.no_embed_class else cfg.num_prefix_tokens
    n_old = v.shape[1] - prefix
    side = int(math.sqrt(n_old))
    if side * side != n_old:
        raise ConversionError(
            f"pos_embed has {v.shape[1]} tokens: {prefix} prefix + {n_old}, not a square grid")
    new = cfg.grid_size
    if (side, side) == tuple(new):
        return state_dict
    out = dict(state_dict)
    out["pos_embed"] = resample_abs_pos_embed(np.asarray(v, np.float32), new, (side, side), prefix)
    return out
