"""EfficientNet-Lite0 (timm `tf_efficientnet_lite0`) in Flax NNX.

Source: timm `timm/models/efficientnet.py` (`_gen_efficientnet_lite`) and
`_efficientnet_blocks.py` (`DepthwiseSeparableConv`, `InvertedResidual`). The `tf_` weights were
trained in TensorFlow: their convolutions use TF 'SAME' padding (timm's `Conv2dSame`, extra pad at
bottom/right), which is exactly XLA's 'SAME', and BatchNorm epsilon 1e-3. Lite variants drop
squeeze-excite, use ReLU6 and keep the stem (32) and head (1280) widths fixed. Stochastic depth
(`drop_path_rate`) follows timm's EfficientNet builder: block k of n gets rate * k / n, and only
blocks with a skip connection apply it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from bob_jax.models import init as init_lib
from bob_jax.models.layers import (
    POOL_DIM_FACTOR,
    DepthwiseConv2d,
    batch_norm,
    conv2d,
    drop_path_or_none,
    dropout_key,
    global_pool,
    linear,
)

BN_EPS_TF = 1e-3


@dataclasses.dataclass(frozen=True)
class StageSpec:
    block: str  # "ds" (depthwise separable) or "ir" (inverted residual)
    repeats: int
    kernel: int
    stride: int
    expand: int
    out_ch: int


# timm arch_def 'ds_r1_k3_s1_e1_c16', 'ir_r2_k3_s2_e6_c24', ... for EfficientNet-Lite.
LITE_STAGES = (
    StageSpec("ds", 1, 3, 1, 1, 16),
    StageSpec("ir", 2, 3, 2, 6, 24),
    StageSpec("ir", 2, 5, 2, 6, 40),
    StageSpec("ir", 3, 3, 2, 6, 80),
    StageSpec("ir", 3, 5, 1, 6, 112),
    StageSpec("ir", 4, 5, 2, 6, 192),
    StageSpec("ir", 1, 3, 1, 6, 320),
)


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig:
    stages: tuple[StageSpec, ...] = LITE_STAGES
    stem_size: int = 32
    num_features: int = 1280
    num_classes: int = 1000
    in_chans: int = 3
    global_pool: str = "avg"
    drop_path_rate: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.drop_path_rate <= 1.0:
            raise ValueError(f"drop_path_rate must lie in [0, 1], got {self.drop_path_rate}")

    @classmethod
    def tf_efficientnet_lite0(cls, **kw):
        return cls(**kw)


ARCHS = {"tf_efficientnet_lite0": EfficientNetConfig.tf_efficientnet_lite0}
ARCH_KWARGS = ("num_classes", "in_chans", "global_pool", "drop_path_rate")


def _relu6(x):
    return jax.nn.relu6(x)


def _residual(x, shortcut, drop_path, key):
    return (x if drop_path is None else drop_path(x, key)) + shortcut


class DepthwiseSeparableConv(nnx.Module):
    def __init__(self, in_ch, out_ch, kernel, stride, drop_path=0.0, stream=0, *, rngs):
        self.conv_dw = DepthwiseConv2d(in_ch, kernel, stride=stride, padding="SAME", rngs=rngs)
        self.bn1 = batch_norm(in_ch, eps=BN_EPS_TF, rngs=rngs)
        self.conv_pw = conv2d(in_ch, out_ch, 1, padding="SAME", rngs=rngs)
        self.bn2 = batch_norm(out_ch, eps=BN_EPS_TF, rngs=rngs)
        self.has_skip = stride == 1 and in_ch == out_ch
        self.drop_path = drop_path_or_none(drop_path, stream)  # timm builds it even without a skip

    def __call__(self, x, key=None):
        shortcut = x
        x = _relu6(self.bn1(self.conv_dw(x)))
        x = self.bn2(self.conv_pw(x))
        return _residual(x, shortcut, self.drop_path, key) if self.has_skip else x


class InvertedResidual(nnx.Module):
    def __init__(self, in_ch, out_ch, kernel, stride, expand, drop_path=0.0, stream=0, *, rngs):
        mid = in_ch * expand
        self.conv_pw = conv2d(in_ch, mid, 1, padding="SAME", rngs=rngs)
        self.bn1 = batch_norm(mid, eps=BN_EPS_TF, rngs=rngs)
        self.conv_dw = DepthwiseConv2d(mid, kernel, stride=stride, padding="SAME", rngs=rngs)
        self.bn2 = batch_norm(mid, eps=BN_EPS_TF, rngs=rngs)
        self.conv_pwl = conv2d(mid, out_ch, 1, padding="SAME", rngs=rngs)
        self.bn3 = batch_norm(out_ch, eps=BN_EPS_TF, rngs=rngs)
        self.has_skip = stride == 1 and in_ch == out_ch
        self.drop_path = drop_path_or_none(drop_path, stream)

    def __call__(self, x, key=None):
        shortcut = x
        x = _relu6(self.bn1(self.conv_pw(x)))
        x = _relu6(self.bn2(self.conv_dw(x)))
        x = self.bn3(self.conv_pwl(x))
        return _residual(x, shortcut, self.drop_path, key) if self.has_skip else x


class EfficientNet(nnx.Module):
    def __init__(self, cfg: EfficientNetConfig, *, rngs: nnx.Rngs):
        if cfg.global_pool not in POOL_DIM_FACTOR:
            raise ValueError(
                f"global_pool={cfg.global_pool!r} is not supported; use one of {sorted(POOL_DIM_FACTOR)}"
            )
        self.cfg = cfg
        self.conv_stem = conv2d(cfg.in_chans, cfg.stem_size, 3, stride=2, padding="SAME", rngs=rngs)
        self.bn1 = batch_norm(cfg.stem_size, eps=BN_EPS_TF, rngs=rngs)
        stages = []
        in_ch, stride_total = cfg.stem_size, 2
        feature_info = {}
        k, n = 0, sum(spec.repeats for spec in cfg.stages)
        for spec in cfg.stages:
            blocks = []
            for b in range(spec.repeats):
                stride = spec.stride if b == 0 else 1
                rate = cfg.drop_path_rate * k / n  # timm's EfficientNet builder rule
                if spec.block == "ds":
                    blocks.append(DepthwiseSeparableConv(in_ch, spec.out_ch, spec.kernel, stride, rate, k,
                                                         rngs=rngs))
                else:
                    blocks.append(InvertedResidual(in_ch, spec.out_ch, spec.kernel, stride, spec.expand,
                                                   rate, k, rngs=rngs))
                in_ch, k = spec.out_ch, k + 1
            stages.append(nnx.List(blocks))
            stride_total *= spec.stride
            # timm's feature_info taps the last block before each stride change (and the last stage).
            feature_info[stride_total] = spec.out_ch
        self._feature_info = tuple(sorted(feature_info.items()))  # hashable static attribute
        self.blocks = nnx.List(stages)
        self.conv_head = conv2d(in_ch, cfg.num_features, 1, padding="SAME", rngs=rngs)
        self.bn2 = batch_norm(cfg.num_features, eps=BN_EPS_TF, rngs=rngs)
        self.num_features = cfg.num_features * POOL_DIM_FACTOR[cfg.global_pool]
        self.classifier = (
            linear(self.num_features, cfg.num_classes, rngs=rngs) if cfg.num_classes > 0 else None
        )

    @property
    def feature_info(self) -> dict[int, int]:
        """Stride -> channels of each map in `out['features']`."""
        return dict(self._feature_info)

    def __call__(self, x, *, intermediates: bool = False, rngs: nnx.Rngs | None = None):
        """`rngs` (`nnx.Rngs(dropout=key)`) drives stochastic depth in train mode; eval ignores it."""
        key = dropout_key(rngs)
        x = _relu6(self.bn1(self.conv_stem(x)))
        stride = 2
        features, inter = {}, {"stem": x}
        for s, (spec, stage) in enumerate(zip(self.cfg.stages, self.blocks)):
            for b, block in enumerate(stage):
                x = block(x, key)
                inter[f"blocks.{s}.{b}"] = x
            stride *= spec.stride
            features[stride] = x  # a later stage at the same stride overwrites: timm taps the last
        x = _relu6(self.bn2(self.conv_head(x)))
        inter["conv_head"] = x
        pooled = global_pool(x, self.cfg.global_pool)
        out = {"pooled": pooled, "features": features}
        if self.classifier is not None:
            out["logits"] = self.classifier(pooled)
        if intermediates:
            out["intermediates"] = inter
        return out


def init_rules(cfg: EfficientNetConfig) -> list[tuple[str, init_lib.InitFn]]:
    """timm `_init_weight_goog`: convs normal(0, sqrt(2 / fan_out)) with fan_out divided by groups,
    BN 1/0, classifier U(+-1/sqrt(num_classes)) with zero bias."""
    return [
        (r".*conv_dw\.kernel", init_lib.conv_goog_fan_out(lambda shape: shape[3])),  # depthwise
        (r".*conv\w*\.kernel", init_lib.conv_goog_fan_out(lambda shape: 1)),
        (r"classifier\.kernel", init_lib.uniform_symmetric(lambda shape: 1.0 / math.sqrt(shape[1]))),
        (r".*\.(scale|var)", init_lib.ones),
        (r".*\.(bias|mean)", init_lib.zeros),
    ]
