"""EfficientNet-Lite0 state dicts -> `bob_jax.models.efficientnet.EfficientNet`.

Two tables: `TIMM_RULES` maps timm `tf_efficientnet_lite0` keys onto the NNX tree (near identity),
and `effnet_pytorch_to_timm` renames the `efficientnet_pytorch` keys of the offline package file
(`_blocks.k._depthwise_conv`, ...) to timm keys first (porting.md section 9).
"""

from __future__ import annotations

import re

import numpy as np

from bob_jax.convert.core import ConversionError, Rule, conv_weight, linear_weight
from bob_jax.models.efficientnet import LITE_STAGES

_BN = r"bn\d|blocks\.\d+\.\d+\.bn\d"

TIMM_RULES = (
    Rule(r".*\.num_batches_tracked", None),
    Rule(r"((?:blocks\.\d+\.\d+\.)?conv_\w+)\.weight", r"\1.kernel", conv_weight),
    Rule(rf"({_BN})\.weight", r"\1.scale"),
    Rule(rf"({_BN})\.bias", r"\1.bias"),
    Rule(rf"({_BN})\.running_mean", r"\1.mean"),
    Rule(rf"({_BN})\.running_var", r"\1.var"),
    Rule(r"classifier\.weight", "classifier.kernel", linear_weight),
    Rule(r"classifier\.bias", "classifier.bias"),
)

# efficientnet_pytorch block module names -> timm names. Block 0 (depthwise separable, no expansion)
# has no `_expand_conv`/`_bn0`, so its BNs shift by one and its projection is timm's `conv_pw`.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def _block_positions() -> list[tuple[int, int, dict[str, str]]]:
    """Flat block index k -> (stage, block-in-stage, module renames), in network order."""
    out = []
    for s, spec in enumerate(LITE_STAGES):
        for b in range(spec.repeats):
            out.append((s, b, _DS_BLOCK if spec.block == "ds" else _IR_BLOCK))
    return out


def effnet_pytorch_to_timm(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename an `efficientnet_pytorch` Lite0 state dict to timm `tf_efficientnet_lite0` keys."""
    positions = _block_positions()
    out, problems = {}, []
    for key, value in state_dict.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            k, module, leaf = int(m.group(1)), m.group(2), m.group(3)
            if k >= len(positions) or module not in positions[k][2]:
                problems.append(key)
                continue
            s, b, names = positions[k]
            out[f"blocks.{s}.{b}.{names[module]}.{leaf}"] = value
            continue
        m = re.fullmatch(r"(\w+)\.(\w+)", key)
        if m and m.group(1) in _TOP:
            out[f"{_TOP[m.group(1)]}.{m.group(2)}"] = value
        else:
            problems.append(key)
    if problems:
        raise ConversionError(
            f"{len(problems)} keys are not EfficientNet-Lite0 (efficientnet_pytorch) keys: "
            f"{sorted(problems)[:20]}"
        )
    return out
