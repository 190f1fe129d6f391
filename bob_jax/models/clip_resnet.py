"""OpenAI CLIP ResNets (timm `resnet50_clip`, `resnet101_clip`, `resnet50x{4,16,64}_clip`) in Flax NNX.

Source: timm `timm/models/byobnet.py` (`ByobNet` with `model_cfgs['resnet*_clip']`) and
`timm/layers/attention_pool2d.py` (`AttentionPool2d`), the port of OpenAI CLIP's `ModifiedResNet`:
- stem: three 3x3 conv-BN-ReLU (`stem.conv1..3`, the first with stride 2), then a 2x2 average pool
  (`nn.AvgPool2d(2)`, floor mode);
- anti-aliased bottlenecks: the stride sits in a 2x2 average pool *after* `conv2_kxk`'s BN-ReLU
  (`ConvNormAct.aa`, the conv itself has stride 1), and the shortcut is `DownsampleAvg`: 2x2 average
  pool (`ceil_mode=True, count_include_pad=False`) then a 1x1 conv-BN, present in the first block of
  every stage (stage 0 too, without the pool);
- head: multi-head attention pooling (`head.q/k/v/proj`, head_dim 64): the tokens are the mean
  token followed by the H*W map tokens, plus a learned `pos_embed` of `feat_size = img_size // 32`
  (+1) positions, resampled (bicubic, antialias, like timm) when the map has another size. The
  output of the mean token is the pooled feature (`pre_logits`), `proj` of it the CLIP image
  embedding (timm's logits; `num_classes` is the embedding width).
Attribute names mirror timm's module tree, so the key table (`bob_jax.convert.clip_resnet`) is an
identity up to Flax's parameter names. BatchNorm eps 1e-5. Stochastic depth (timm's ByobNet, not in
OpenAI's original): each bottleneck's `drop_path` after `conv3_1x1`, rates linear over all blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bob_jax.models import init as init_lib
from bob_jax.models.init import trunc_normal
from bob_jax.models.layers import (
    batch_norm,
    conv2d,
    drop_path_or_none,
    drop_path_rates,
    dropout_key,
    linear,
    to_2tuple,
    torch_padding,
)
from bob_jax.models.pos_embed import resample_abs_pos_embed


def _make_divisible(v: float, divisor: int = 8) -> int:
    """timm `make_divisible` (min_value=divisor, round_limit=.9)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@dataclasses.dataclass(frozen=True)
class ClipResNetConfig:
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    width_factor: float = 1.0
    num_classes: int = 1024  # width of the CLIP embedding (`head.proj`); 0 drops the projection
    in_chans: int = 3
    img_size: tuple[int, int] = (224, 224)  # fixes the attention-pool pos_embed grid (img_size // 32)
    global_pool: str = "token"
    drop_path_rate: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        if self.global_pool != "token":
            raise ValueError(
                f"global_pool={self.global_pool!r} is not supported for CLIP ResNets; only 'token' "
                "(the attention pool's mean-token output) is implemented"
            )

    @property
    def stem_chs(self) -> tuple[int, int, int]:
        return tuple(int(round(c * self.width_factor)) for c in (32, 32, 64))

    @property
    def stage_chs(self) -> tuple[int, int, int, int]:
        return tuple(_make_divisible(c * self.width_factor) for c in (256, 512, 1024, 2048))

    @property
    def feat_size(self) -> tuple[int, int]:
        return (self.img_size[0] // 32, self.img_size[1] // 32)


def _arch(layers, width_factor, num_classes, img_size):
    def make(**kw):
        kw = {"num_classes": num_classes, "img_size": img_size, **kw}
        return ClipResNetConfig(layers=layers, width_factor=width_factor, **kw)

    return make


# Defaults (num_classes, img_size) are those of the `.openai` pretrained cfgs timm builds with.
ARCHS = {
    "resnet50_clip": _arch((3, 4, 6, 3), 1.0, 1024, 224),
    "resnet101_clip": _arch((3, 4, 23, 3), 1.0, 512, 224),
    "resnet50x4_clip": _arch((4, 6, 10, 6), 1.25, 640, 288),
    "resnet50x16_clip": _arch((6, 8, 18, 8), 1.5, 768, 384),
    "resnet50x64_clip": _arch((3, 15, 36, 10), 2.0, 1024, 448),
}
# The keyword arguments timm.create_model accepts for these models that we implement.
ARCH_KWARGS = ("num_classes", "in_chans", "img_size", "global_pool", "drop_path_rate")


def avg_pool_2x2(x, *, ceil_mode: bool = False):
    """`nn.AvgPool2d(2, 2)` on NHWC; `ceil_mode=True` (with `count_include_pad=False`) keeps the
    partial last window of an odd side and averages only its valid pixels."""
    b, h, w, c = x.shape
    if not ceil_mode or (h % 2 == 0 and w % 2 == 0):
        ho, wo = h // 2, w // 2
        x = x[:, : 2 * ho, : 2 * wo]
        return x.reshape(b, ho, 2, wo, 2, c).mean(axis=(2, 4))
    ph, pw = h % 2, w % 2
    xp = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    ones = jnp.pad(jnp.ones((1, h, w, 1), x.dtype), ((0, 0), (0, ph), (0, pw), (0, 0)))
    ho, wo = (h + ph) // 2, (w + pw) // 2
    total = xp.reshape(b, ho, 2, wo, 2, c).sum(axis=(2, 4))
    count = ones.reshape(1, ho, 2, wo, 2, 1).sum(axis=(2, 4))
    return total / count


class ConvNormAct(nnx.Module):
    """timm `ConvNormAct`: conv (no bias, symmetric padding) -> BN -> optional ReLU -> optional 2x2
    avg-pool anti-aliasing (`aa`, which then carries the stride instead of the conv)."""

    def __init__(self, in_ch, out_ch, kernel_size, *, act: bool = True, aa: bool = False, stride: int = 1,
                 rngs: nnx.Rngs):
        conv_stride = 1 if aa else stride
        self.conv = conv2d(in_ch, out_ch, kernel_size, stride=conv_stride,
                           padding=torch_padding(kernel_size, conv_stride), rngs=rngs)
        self.bn = batch_norm(out_ch, rngs=rngs)
        self.act = act
        self.aa = aa and stride > 1

    def __call__(self, x):
        x = self.bn(self.conv(x))
        if self.act:
            x = jax.nn.relu(x)
        if self.aa:
            x = avg_pool_2x2(x)
        return x


class Stem(nnx.Module):
    def __init__(self, in_ch: int, chs: tuple[int, int, int], *, rngs: nnx.Rngs):
        self.conv1 = ConvNormAct(in_ch, chs[0], 3, stride=2, rngs=rngs)
        self.conv2 = ConvNormAct(chs[0], chs[1], 3, rngs=rngs)
        self.conv3 = ConvNormAct(chs[1], chs[2], 3, rngs=rngs)

    def __call__(self, x):
        """Returns (stride-4 output after the 2x2 pool, stride-2 output of conv3)."""
        x = self.conv3(self.conv2(self.conv1(x)))
        return avg_pool_2x2(x), x


class DownsampleAvg(nnx.Module):
    """timm `DownsampleAvg`: 2x2 avg-pool (ceil mode, stride > 1 only) -> 1x1 conv -> BN (no act)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, *, rngs: nnx.Rngs):
        self.stride = stride
        self.conv = ConvNormAct(in_ch, out_ch, 1, act=False, rngs=rngs)

    def __call__(self, x):
        if self.stride > 1:
            x = avg_pool_2x2(x, ceil_mode=True)
        return self.conv(x)


class BottleneckBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, drop_path: float = 0.0, stream: int = 0, *,
                 rngs: nnx.Rngs):
        mid = _make_divisible(out_ch * 0.25)
        if stride != 1 or in_ch != out_ch:
            self.shortcut = DownsampleAvg(in_ch, out_ch, stride, rngs=rngs)
        else:
            self.shortcut = None
        self.conv1_1x1 = ConvNormAct(in_ch, mid, 1, rngs=rngs)
        self.conv2_kxk = ConvNormAct(mid, mid, 3, stride=stride, aa=True, rngs=rngs)
        self.conv3_1x1 = ConvNormAct(mid, out_ch, 1, act=False, rngs=rngs)
        self.drop_path = drop_path_or_none(drop_path, stream)

    def __call__(self, x, key=None):
        shortcut = x if self.shortcut is None else self.shortcut(x)
        x = self.conv3_1x1(self.conv2_kxk(self.conv1_1x1(x)))
        if self.drop_path is not None:
            x = self.drop_path(x, key)
        return jax.nn.relu(x + shortcut)


class AttentionPool2d(nnx.Module):
    """timm `AttentionPool2d(qkv_separate=True, pool_type='token')`: only the mean token's output is
    used, so only its query is computed (row-wise identical to timm's full attention)."""

    def __init__(self, dim: int, feat_size: tuple[int, int], num_classes: int, *, head_dim: int = 64,
                 rngs: nnx.Rngs):
        self.num_heads, self.head_dim = dim // head_dim, head_dim
        self.feat_size = feat_size
        self.q = linear(dim, dim, rngs=rngs)
        self.k = linear(dim, dim, rngs=rngs)
        self.v = linear(dim, dim, rngs=rngs)
        self.proj = linear(dim, num_classes, rngs=rngs) if num_classes > 0 else None
        self.pos_embed = nnx.Param(jnp.zeros((feat_size[0] * feat_size[1] + 1, dim), jnp.float32))

    def __call__(self, x):
        """x: [B, H, W, C] -> (pooled [B, C], logits [B, num_classes] or None)."""
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        pos = resample_abs_pos_embed(self.pos_embed[...][None], (h, w), self.feat_size, 1)
        tokens = tokens + pos.astype(tokens.dtype)
        nh, hd = self.num_heads, self.head_dim
        q = self.q(tokens[:, :1]).reshape(b, 1, nh, hd)
        k = self.k(tokens).reshape(b, h * w + 1, nh, hd)
        v = self.v(tokens).reshape(b, h * w + 1, nh, hd)
        attn = jnp.einsum("bqhd,bkhd->bhqk", q * (hd ** -0.5), k)
        attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)
        pooled = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, c)
        return pooled, (self.proj(pooled) if self.proj is not None else None)


class ClipResNet(nnx.Module):
    def __init__(self, cfg: ClipResNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.stem = Stem(cfg.in_chans, cfg.stem_chs, rngs=rngs)
        in_ch = cfg.stem_chs[-1]
        rates = drop_path_rates(cfg.drop_path_rate, sum(cfg.layers))
        stages, k = [], 0
        for i, (depth, out_ch) in enumerate(zip(cfg.layers, cfg.stage_chs)):
            blocks = []
            for b in range(depth):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(BottleneckBlock(in_ch, out_ch, stride, rates[k], k, rngs=rngs))
                in_ch, k = out_ch, k + 1
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.num_features = in_ch
        self.head = AttentionPool2d(in_ch, cfg.feat_size, cfg.num_classes, rngs=rngs)
        # A tuple, not a dict: static attributes must be hashable for the graphdef to be a jit key.
        self._feature_info = ((2, cfg.stem_chs[-1]),) + tuple(
            (4 * 2**i, c) for i, c in enumerate(cfg.stage_chs)
        )

    @property
    def feature_info(self) -> dict[int, int]:
        """Stride -> channels of each map in `out['features']` (timm's feature_info)."""
        return dict(self._feature_info)

    def __call__(self, x, *, intermediates: bool = False, rngs: nnx.Rngs | None = None):
        """`rngs` (`nnx.Rngs(dropout=key)`) drives stochastic depth in train mode; eval ignores it."""
        key = dropout_key(rngs)
        x, stem_map = self.stem(x)
        features = {2: stem_map}
        inter = {"stem": x}
        for i, stage in enumerate(self.stages):
            for b, block in enumerate(stage):
                x = block(x, key)
                inter[f"stages.{i}.{b}"] = x
            features[4 * 2**i] = x
        pooled, logits = self.head(x)
        out = {"pooled": pooled, "features": features}
        if logits is not None:
            out["logits"] = logits
        if intermediates:
            out["intermediates"] = inter
        return out


def _normal(std: float) -> init_lib.InitFn:
    """`nn.init.normal_(w, 0, std)`."""
    return lambda rng, shape, dtype: (rng.standard_normal(shape, np.float32) * np.float32(std)).astype(dtype)


def init_rules(cfg: ClipResNetConfig) -> list[tuple[str, init_lib.InitFn]]:
    """timm `byobnet._init_weights` (depth-first `named_apply`, zero_init_last=True): convs
    normal(0, sqrt(2 / fan_out)), BN 1/0 with the last BN gamma of every bottleneck at zero, Linear
    normal(0, .01) + zero bias; then `AttentionPool2d.init_weights` redraws q/k/v and `pos_embed`
    trunc_normal(std = dim ** -0.5) with zero q/k/v biases (`proj` keeps normal(.01))."""
    dim = cfg.stage_chs[-1]
    return [
        (r"stages\.\d+\.\d+\.conv3_1x1\.bn\.scale", init_lib.zeros),
        (r".*\.conv\.kernel", init_lib.conv_kaiming_fan_out),
        (r"head\.(q|k|v)\.kernel", trunc_normal(dim ** -0.5)),
        (r"head\.pos_embed", trunc_normal(dim ** -0.5)),
        (r"head\.proj\.kernel", _normal(0.01)),
        (r".*\.(scale|var)", init_lib.ones),
        (r".*\.(bias|mean)", init_lib.zeros),
    ]
