"""timm Swin v1 / SwinV2 state dicts -> `bob_jax.models.swin` / `bob_jax.models.swinv2`.

The NNX tree mirrors timm's, so the table is near-identity (Linear weight -> kernel transposed,
LayerNorm weight -> scale, conv weight -> HWIO). Two foreign layouts are renamed to timm's first:
- the original Microsoft / timm < 0.9 layout, where PatchMerging sits at the END of stages 0..2
  (`layers.i.downsample` -> `layers.{i+1}.downsample`) and the classifier is `head.*` (-> `head.fc.*`),
  exactly timm's `checkpoint_filter_fn`;
- MiDaS v3.1 DPT checkpoints (`dpt_swin2_tiny_256.pt`, `dpt_swin2_base_384.pt`, ...): the encoder is
  the whole timm 0.6 model under `pretrained.model.` (old layout, see above); the DPT neck/head
  (`scratch.*`, `pretrained.act_postprocess*`) is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from bob_jax.convert.core import Rule, conv_weight, linear_weight

_LINEAR = r"qkv|proj|fc1|fc2|reduction|fc|cpb_mlp\.[02]"

TIMM_RULES = (
    # timm's non-persistent buffers. They are absent from `model.state_dict()` in timm 1.0.31 but present
    # in checkpoints saved by older timm versions and in the original / MiDaS files (timm's own
    # checkpoint_filter_fn skips them). We recompute each from the config; the test suite checks the
    # recomputed relative_position_index, relative_coords_table, zero k_bias and attn_mask against
    # timm's buffers.
    Rule(r".*\.(?:relative_position_index|relative_coords_table|k_bias)", None),
    Rule(r".*\.attn_mask", None),
    Rule(r"patch_embed\.proj\.weight", "patch_embed.proj.kernel", conv_weight),
    Rule(r"(.*\.(?:relative_position_bias_table|logit_scale|q_bias|v_bias))", r"\1"),
    Rule(rf"(.*(?:{_LINEAR}))\.weight", r"\1.kernel", linear_weight),
    Rule(r"(.*norm\d?)\.weight", r"\1.scale"),
    Rule(r"(.*)\.bias", r"\1.bias"),
)


def is_stage_end_layout(state_dict: Mapping[str, np.ndarray]) -> bool:
    """Original Microsoft / timm < 0.9 layout: stage 0 owns a PatchMerging (timm's test)."""
    return "layers.0.downsample.reduction.weight" in state_dict


def stage_end_to_timm(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm `checkpoint_filter_fn`'s rename: layers.i.downsample -> layers.{i+1}.downsample and
    head. -> head.fc."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
        if k.startswith("head.") and not k.startswith("head.fc."):
            k = "head.fc." + k[len("head."):]
        out[k] = v
    return out


MIDAS_PREFIX = "pretrained.model."


def is_midas_dpt(state_dict: Mapping[str, np.ndarray]) -> bool:
    return any(k.startswith(MIDAS_PREFIX) for k in state_dict)


def midas_dpt_to_timm(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep the encoder (`pretrained.model.*`, a complete timm 0.6 Swin(V2) incl. its final norm and
    the untouched ImageNet classifier `head.*`), drop the DPT neck and depth head (`scratch.*`,
    `pretrained.act_postprocess*`), then rename the stage-end layout to timm's."""
    enc = {k[len(MIDAS_PREFIX):]: v for k, v in state_dict.items() if k.startswith(MIDAS_PREFIX)}
    return stage_end_to_timm(enc) if is_stage_end_layout(enc) else enc


FOREIGN_LAYOUTS = (
    (is_midas_dpt, midas_dpt_to_timm),
    (is_stage_end_layout, stage_end_to_timm),
)
