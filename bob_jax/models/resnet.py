"""ResNet-50/101 (v1.5, torchvision/timm layout) in Flax NNX.

Source: timm `timm/models/resnet.py` (`ResNet`, `Bottleneck`), which shares key names with
torchvision. The stride sits in the 3x3 `conv2` (v1.5); every PyTorch-style conv and the stem
max-pool use explicit symmetric padding. Attribute names mirror timm's module tree, so the converter
table (`bob_jax.convert.resnet`) is close to identity. Stochastic depth (`drop_path_rate`) follows
timm's rule: block k of n (counted over all stages) drops its residual branch with rate * k / (n - 1).
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from bob_jax.models import init as init_lib
from bob_jax.models.layers import (
    POOL_DIM_FACTOR,
    batch_norm,
    conv2d,
    drop_path_or_none,
    dropout_key,
    global_pool,
    linear,
    max_pool,
    torch_padding,
)


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    num_classes: int = 1000
    in_chans: int = 3
    global_pool: str = "avg"
    zero_init_last: bool = True
    drop_path_rate: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.drop_path_rate <= 1.0:
            raise ValueError(f"drop_path_rate must lie in [0, 1], got {self.drop_path_rate}")

    @classmethod
    def resnet50(cls, **kw):
        return cls(layers=(3, 4, 6, 3), **kw)

    @classmethod
    def resnet101(cls, **kw):
        return cls(layers=(3, 4, 23, 3), **kw)


ARCHS = {"resnet50": ResNetConfig.resnet50, "resnet101": ResNetConfig.resnet101}
# The keyword arguments timm.create_model accepts for these models that we implement.
ARCH_KWARGS = ("num_classes", "in_chans", "global_pool", "zero_init_last", "drop_path_rate")


class Bottleneck(nnx.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, drop_path: float = 0.0, stream: int = 0, *,
                 rngs: nnx.Rngs):
        out_ch = width * self.expansion
        self.conv1 = conv2d(in_ch, width, 1, padding=((0, 0), (0, 0)), rngs=rngs)
        self.bn1 = batch_norm(width, rngs=rngs)
        self.conv2 = conv2d(width, width, 3, stride=stride, padding=torch_padding(3, stride), rngs=rngs)
        self.bn2 = batch_norm(width, rngs=rngs)
        self.conv3 = conv2d(width, out_ch, 1, padding=((0, 0), (0, 0)), rngs=rngs)
        self.bn3 = batch_norm(out_ch, rngs=rngs)
        if stride != 1 or in_ch != out_ch:
            # timm's `downsample_conv` is nn.Sequential(conv, bn): keys `downsample.0`, `downsample.1`.
            self.downsample = nnx.List(
                [
                    conv2d(in_ch, out_ch, 1, stride=stride, padding=((0, 0), (0, 0)), rngs=rngs),
                    batch_norm(out_ch, rngs=rngs),
                ]
            )
        else:
            self.downsample = None
        self.drop_path = drop_path_or_none(drop_path, stream)

    def __call__(self, x, key=None):
        shortcut = x
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = jax.nn.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        if self.drop_path is not None:
            x = self.drop_path(x, key)
        if self.downsample is not None:
            shortcut = self.downsample[1](self.downsample[0](shortcut))
        return jax.nn.relu(x + shortcut)


class ResNet(nnx.Module):
    def __init__(self, cfg: ResNetConfig, *, rngs: nnx.Rngs):
        if cfg.global_pool not in POOL_DIM_FACTOR:
            raise ValueError(
                f"global_pool={cfg.global_pool!r} is not supported for ResNet; "
                f"use one of {sorted(POOL_DIM_FACTOR)}"
            )
        self.cfg = cfg
        self.conv1 = conv2d(cfg.in_chans, 64, 7, stride=2, padding=torch_padding(7, 2), rngs=rngs)
        self.bn1 = batch_norm(64, rngs=rngs)
        in_ch, k, n = 64, 0, sum(cfg.layers)
        for i, (depth, width) in enumerate(zip(cfg.layers, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            blocks = []
            for b in range(depth):
                rate = cfg.drop_path_rate * k / max(n - 1, 1)  # timm's ResNet rule
                blocks.append(Bottleneck(in_ch, width, stride if b == 0 else 1, rate, k, rngs=rngs))
                in_ch, k = width * Bottleneck.expansion, k + 1
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
        self.num_features = in_ch * POOL_DIM_FACTOR[cfg.global_pool]
        self.fc = linear(self.num_features, cfg.num_classes, rngs=rngs) if cfg.num_classes > 0 else None
        # A tuple, not a dict: static attributes must be hashable for the graphdef to be a jit key.
        self._feature_info = ((2, 64), (4, 256), (8, 512), (16, 1024), (32, 2048))

    @property
    def feature_info(self) -> dict[int, int]:
        """Stride -> channels of each map in `out['features']`."""
        return dict(self._feature_info)

    def __call__(self, x, *, intermediates: bool = False, rngs: nnx.Rngs | None = None):
        """`rngs` (`nnx.Rngs(dropout=key)`) drives stochastic depth in train mode; eval ignores it."""
        key = dropout_key(rngs)
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        features = {2: x}
        inter = {"stem": x}
        x = max_pool(x, 3, 2, 1)
        for i in range(4):
            for b, block in enumerate(getattr(self, f"layer{i + 1}")):
                x = block(x, key)
                inter[f"layer{i + 1}.{b}"] = x
            features[4 * 2**i] = x
        pooled = global_pool(x, self.cfg.global_pool)
        out = {"pooled": pooled, "features": features}
        if self.fc is not None:
            out["logits"] = self.fc(pooled)
        if intermediates:
            out["intermediates"] = inter
        return out


def init_rules(cfg: ResNetConfig) -> list[tuple[str, init_lib.InitFn]]:
    """timm `ResNet.init_weights`: kaiming-normal (fan_out) convs, BN 1/0, torch-default Linear,
    and with `zero_init_last` the last BN gamma of every block at zero."""
    fc_in = 2048 * POOL_DIM_FACTOR[cfg.global_pool]
    zero_last = [(r"layer\d\.\d+\.bn3\.scale", init_lib.zeros)] if cfg.zero_init_last else []
    return zero_last + [
        (r"(conv1|layer\d\.\d+\.(conv\d|downsample\.0))\.kernel", init_lib.conv_kaiming_fan_out),
        (r"fc\.kernel", init_lib.torch_linear_weight),
        (r"fc\.bias", init_lib.torch_linear_bias(fc_in)),
        (r".*\.(scale|var)", init_lib.ones),
        (r".*\.(bias|mean)", init_lib.zeros),
    ]
