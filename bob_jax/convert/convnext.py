"""ConvNeXt state dicts -> `bob_jax.models.convnext.ConvNeXt`.

Two tables: `TIMM_RULES` maps timm `convnext_*` keys onto the NNX tree (near identity), and
`official_to_timm` renames the official ConvNeXt / VICRegL layout (facebookresearch/ConvNeXt,
facebookresearch/VICRegL `convnext.py`) to timm keys first, as timm's `checkpoint_filter_fn` does:

  downsample_layers.0.{0,1}   -> stem.{0,1}
  downsample_layers.N.{0,1}   -> stages.N.downsample.{0,1}         (N = 1..3)
  stages.N.M.dwconv           -> stages.N.blocks.M.conv_dw
  stages.N.M.pwconv{1,2}      -> stages.N.blocks.M.mlp.fc{1,2}
  stages.N.M.{norm,gamma}     -> stages.N.blocks.M.{norm,gamma}
  head.{weight,bias}          -> head.fc.{weight,bias}
  norm.{weight,bias}          -> head.norm.*  when the file has a classifier (`head.weight`), else
                                 norm_pre.*   (backbone-only files)

The second case is the VICRegL backbone: its `forward_features` applies the final LayerNorm to every
position and then averages (norm -> pool), which is timm's `head_norm_first=True` (`norm_pre`), not
the classifier's pool -> norm (`head.norm`). VICRegL also trains with `layer_scale_init_value=0`, so
its blocks have no `gamma`; timm cannot build a ConvNeXt without layer scale through create_model
(it drops `ls_init_value=None`), so the renamer adds gamma = 1 to such blocks, an exact identity.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from bob_jax.convert.core import ConversionError, Rule, conv_weight, linear_weight


def _fc_weight(w: np.ndarray) -> np.ndarray:
    """Linear `[out, in]` or 1x1 conv `[out, in, 1, 1]` (timm `conv_mlp=True`) -> kernel `[in, out]`."""
    if w.ndim == 4 and w.shape[2:] != (1, 1):
        return w  # not a 1x1 conv: left as is so that the shape check reports it
    return linear_weight(w.reshape(w.shape[0], w.shape[1]))


_LN = r"stem\.1|stages\.\d+\.downsample\.0|stages\.\d+\.blocks\.\d+\.norm|head\.norm|norm_pre"
_CONV = r"stem\.0|stages\.\d+\.downsample\.1|stages\.\d+\.blocks\.\d+\.conv_dw"
_FC = r"stages\.\d+\.blocks\.\d+\.mlp\.fc[12]|head\.fc"

TIMM_RULES = (
    Rule(rf"({_LN})\.weight", r"\1.scale"),
    Rule(rf"({_LN})\.bias", r"\1.bias"),
    Rule(rf"({_CONV})\.weight", r"\1.kernel", conv_weight),
    Rule(rf"({_CONV})\.bias", r"\1.bias"),
    Rule(rf"({_FC})\.weight", r"\1.kernel", _fc_weight),
    Rule(rf"({_FC})\.bias", r"\1.bias"),
    Rule(r"(stages\.\d+\.blocks\.\d+)\.gamma", r"\1.gamma"),
)

_OFFICIAL = (
    (r"downsample_layers\.0\.([01])\.(weight|bias)", r"stem.\1.\2"),
    (r"downsample_layers\.([123])\.([01])\.(weight|bias)", r"stages.\1.downsample.\2.\3"),
    (r"stages\.(\d+)\.(\d+)\.dwconv\.(weight|bias)", r"stages.\1.blocks.\2.conv_dw.\3"),
    (r"stages\.(\d+)\.(\d+)\.pwconv([12])\.(weight|bias)", r"stages.\1.blocks.\2.mlp.fc\3.\4"),
    (r"stages\.(\d+)\.(\d+)\.norm\.(weight|bias)", r"stages.\1.blocks.\2.norm.\3"),
    (r"stages\.(\d+)\.(\d+)\.gamma", r"stages.\1.blocks.\2.gamma"),
    (r"head\.(weight|bias)", r"head.fc.\1"),
)


def is_official_layout(state_dict: Mapping[str, np.ndarray]) -> bool:
    return "downsample_layers.0.0.weight" in state_dict


def official_to_timm(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename an official ConvNeXt / VICRegL state dict to timm `convnext_*` keys (see module doc)."""
    final_norm = "head.norm" if "head.weight" in state_dict else "norm_pre"
    rules = [(re.compile(s), t) for s, t in _OFFICIAL]
    rules.append((re.compile(r"norm\.(weight|bias)"), final_norm + r".\1"))
    out, problems = {}, []
    for key, value in state_dict.items():
        for rx, template in rules:
            m = rx.fullmatch(key)
            if m:
                out[m.expand(template)] = value
                break
        else:
            problems.append(key)
    for key, value in list(out.items()):
        m = re.fullmatch(r"(stages\.\d+\.blocks\.\d+)\.conv_dw\.weight", key)
        if m and f"{m.group(1)}.gamma" not in out:  # trained without layer scale (VICRegL)
            out[f"{m.group(1)}.gamma"] = np.ones(value.shape[:1], value.dtype)
    if problems:
        raise ConversionError(
            f"{len(problems)} keys are not official ConvNeXt (downsample_layers/stages/norm/head) keys: "
            f"{sorted(problems)[:20]}"
        )
    return out
