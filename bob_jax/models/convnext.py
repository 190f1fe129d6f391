"""ConvNeXt (timm `timm/models/convnext.py`, FB's original ConvNeXt layout) in Flax NNX.

Source: timm `ConvNeXt`, `ConvNeXtStage`, `ConvNeXtBlock`, `NormMlpClassifierHead`. Attribute names
mirror timm's module tree, so the converter table (`bob_jax.convert.convnext`) is near identity:

  stem.0 (conv 4x4/4, bias) -> stem.1 (LayerNorm2d, eps 1e-6)
  stages.i.downsample.{0,1} (LayerNorm2d, conv 2x2/2, bias; stages 1..3 only)
  stages.i.blocks.j: conv_dw 7x7 depthwise pad 3 (bias) -> norm (LN 1e-6) -> mlp.fc1 (4x) -> exact
    GELU -> mlp.fc2 -> x gamma (layer scale) -> drop_path (stochastic depth) -> + identity
  head (FB order, `head_norm_first=False`): global pool -> head.norm (LN) -> head.fc
  `head_norm_first=True`: norm_pre (LN) on the map -> global pool -> head.fc

timm's LayerNorm2d normalises over channels of an NCHW map, i.e. a plain channels-last LayerNorm on
our NHWC maps; `conv_mlp=True` (1x1-conv MLP with LayerNorm2d) is the same computation, only its
fc weights are stored as [out, in, 1, 1] (the converter reshapes them). Stochastic depth rates rise
linearly over all blocks (`layers.drop_path_rates`), as timm's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bob_jax.models import init as init_lib
from bob_jax.models import layers
from bob_jax.models.layers import (
    POOL_DIM_FACTOR,
    DepthwiseConv2d,
    conv2d,
    drop_path_or_none,
    drop_path_rates,
    dropout_key,
    global_pool,
    linear,
)

LN_EPS = 1e-6
_NO_PAD = ((0, 0), (0, 0))


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    num_classes: int = 1000
    in_chans: int = 3
    global_pool: str = "avg"
    ls_init_value: float = 1e-6
    head_norm_first: bool = False
    conv_mlp: bool = False
    drop_path_rate: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        if len(self.depths) != 4 or len(self.dims) != 4:
            raise ValueError(f"ConvNeXt needs 4 stages: got depths={self.depths}, dims={self.dims}")
        if self.ls_init_value is None:
            # timm.create_model drops None-valued kwargs, so timm's model keeps its 1e-6 layer scale;
            # a checkpoint without gammas (VICRegL) loads with gamma = 1 (convert.official_to_timm).
            raise ValueError(
                "ls_init_value=None is not supported (timm.create_model ignores it and keeps layer scale); "
                "pass a float"
            )
        if self.global_pool not in POOL_DIM_FACTOR:
            raise ValueError(
                f"global_pool={self.global_pool!r} is not supported for ConvNeXt; "
                f"use one of {sorted(POOL_DIM_FACTOR)}"
            )
        if not self.head_norm_first and POOL_DIM_FACTOR[self.global_pool] != 1:
            # timm's NormMlpClassifierHead asserts feat_mult() == 1 as well.
            raise ValueError(
                f"global_pool={self.global_pool!r} widens the pooled features, which ConvNeXt's "
                "pool -> norm head does not support (timm neither); use 'avg', 'max' or 'avgmax'"
            )


def _variant(depths, dims):
    def make(**kw):
        return ConvNeXtConfig(**{"depths": depths, "dims": dims, **kw})

    return make


ARCHS = {
    "convnext_tiny": _variant((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": _variant((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": _variant((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": _variant((3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnext_xlarge": _variant((3, 3, 27, 3), (256, 512, 1024, 2048)),
}
# timm.create_model keyword arguments we implement (others, e.g. drop_rate, raise TypeError).
ARCH_KWARGS = (
    "num_classes",
    "in_chans",
    "global_pool",
    "depths",
    "dims",
    "ls_init_value",
    "head_norm_first",
    "conv_mlp",
    "drop_path_rate",
)


def layer_norm(dim: int, *, rngs) -> nnx.LayerNorm:
    """timm `LayerNorm` / `LayerNorm2d` on a channels-last map: eps 1e-6, two-pass variance."""
    return layers.layer_norm(dim, eps=LN_EPS, rngs=rngs)


class DepthwiseConv2dBias(DepthwiseConv2d):
    """`layers.DepthwiseConv2d` plus a per-channel bias (timm's `conv_dw` has `bias=True`)."""

    def __init__(self, channels: int, kernel_size: int, *, padding, rngs: nnx.Rngs):
        super().__init__(channels, kernel_size, padding=padding, rngs=rngs)
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x):
        return super().__call__(x) + self.bias[...].astype(x.dtype)


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = linear(dim, hidden, rngs=rngs)
        self.fc2 = linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class ConvNeXtBlock(nnx.Module):
    def __init__(self, dim: int, ls_init_value: float, drop_path: float = 0.0, stream: int = 0, *,
                 rngs: nnx.Rngs):
        self.conv_dw = DepthwiseConv2dBias(dim, 7, padding=((3, 3), (3, 3)), rngs=rngs)
        self.norm = layer_norm(dim, rngs=rngs)
        self.mlp = Mlp(dim, 4 * dim, rngs=rngs)
        self.gamma = nnx.Param(jnp.full((dim,), ls_init_value, jnp.float32))
        self.drop_path = drop_path_or_none(drop_path, stream)

    def __call__(self, x, key=None):
        y = self.mlp(self.norm(self.conv_dw(x)))
        y = y * self.gamma[...].astype(y.dtype)
        return x + (y if self.drop_path is None else self.drop_path(y, key))


class ConvNeXtStage(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, downsample: bool, ls_init_value, drop_paths,
                 first_stream: int, *, rngs):
        if downsample:
            # nn.Sequential(LayerNorm2d, Conv2d 2x2/2): keys `downsample.0`, `downsample.1`.
            self.downsample = nnx.List(
                [
                    layer_norm(in_ch, rngs=rngs),
                    conv2d(in_ch, out_ch, 2, stride=2, padding=_NO_PAD, bias=True, rngs=rngs),
                ]
            )
        else:
            self.downsample = None
        self.blocks = nnx.List([ConvNeXtBlock(out_ch, ls_init_value, rate, first_stream + j, rngs=rngs)
                                for j, rate in enumerate(drop_paths)])


class NormHead(nnx.Module):
    """timm `NormMlpClassifierHead` without hidden layer: pool -> norm -> fc."""

    def __init__(self, dim: int, num_classes: int, *, rngs):
        self.norm = layer_norm(dim, rngs=rngs)
        self.fc = linear(dim, num_classes, rngs=rngs) if num_classes > 0 else None


class ClassifierHead(nnx.Module):
    """timm `ClassifierHead`: pool -> fc (used with `head_norm_first=True`)."""

    def __init__(self, dim: int, num_classes: int, *, rngs):
        self.fc = linear(dim, num_classes, rngs=rngs) if num_classes > 0 else None


class ConvNeXt(nnx.Module):
    def __init__(self, cfg: ConvNeXtConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.dims
        self.stem = nnx.List(
            [
                conv2d(cfg.in_chans, d[0], 4, stride=4, padding=_NO_PAD, bias=True, rngs=rngs),
                layer_norm(d[0], rngs=rngs),
            ]
        )
        stages, prev = [], d[0]
        rates = drop_path_rates(cfg.drop_path_rate, sum(cfg.depths))
        for i in range(4):
            first = sum(cfg.depths[:i])
            stage_rates = rates[first : first + cfg.depths[i]]
            stages.append(ConvNeXtStage(prev, d[i], i > 0, cfg.ls_init_value, stage_rates, first, rngs=rngs))
            prev = d[i]
        self.stages = nnx.List(stages)
        if cfg.head_norm_first:
            self.norm_pre = layer_norm(prev, rngs=rngs)
            self.num_features = prev * POOL_DIM_FACTOR[cfg.global_pool]
            self.head = ClassifierHead(self.num_features, cfg.num_classes, rngs=rngs)
        else:
            self.norm_pre = None
            self.num_features = prev
            self.head = NormHead(prev, cfg.num_classes, rngs=rngs)
        # A tuple, not a dict: static attributes must be hashable for the graphdef to be a jit key.
        self._feature_info = tuple((4 * 2**i, d[i]) for i in range(4))

    @property
    def feature_info(self) -> dict[int, int]:
        """Stride -> channels of each map in `out['features']`."""
        return dict(self._feature_info)

    def __call__(self, x, *, intermediates: bool = False, rngs: nnx.Rngs | None = None):
        """`rngs` (`nnx.Rngs(dropout=key)`) drives stochastic depth in train mode; eval ignores it."""
        key = dropout_key(rngs)
        x = self.stem[1](self.stem[0](x))
        features, inter = {}, {"stem": x}
        for i, stage in enumerate(self.stages):
            if stage.downsample is not None:
                x = stage.downsample[1](stage.downsample[0](x))
            for b, block in enumerate(stage.blocks):
                x = block(x, key)
                inter[f"stages.{i}.blocks.{b}"] = x
            features[4 * 2**i] = x
        if self.norm_pre is not None:
            pooled = global_pool(self.norm_pre(x), self.cfg.global_pool)
        else:
            pooled = self.head.norm(global_pool(x, self.cfg.global_pool))
        out = {"pooled": pooled, "features": features}
        if self.head.fc is not None:
            out["logits"] = self.head.fc(pooled)
        if intermediates:
            out["intermediates"] = inter
        return out


def _constant(value: float) -> init_lib.InitFn:
    return lambda rng, shape, dtype: np.full(shape, value, dtype)


def init_rules(cfg: ConvNeXtConfig) -> list[tuple[str, init_lib.InitFn]]:
    """timm `convnext._init_weights` (head_init_scale=1): init_lib.trunc_normal(std .02) conv and linear
    weights, zero biases, LayerNorms 1/0, layer-scale gammas = ls_init_value."""
    return [
        (r".*\.gamma", _constant(cfg.ls_init_value)),
        (r".*\.kernel", init_lib.trunc_normal(0.02)),
        (r".*\.scale", init_lib.ones),
        (r".*\.bias", init_lib.zeros),
    ]

