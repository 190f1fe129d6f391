"""Swin Transformer V2 (timm `swin_transformer_v2.py`) in Flax NNX.

Same skeleton as v1 (`bob_jax.models.swin`: NHWC, merging at stage start, LayerNorm eps 1e-5, exact
GELU, -100 shift mask, window clamping, roll-then-pad), with the v2 changes (porting.md section 5,
15 item 7):
- residual post-norm: x + norm1(attn(x)), x + norm2(mlp(x));
- cosine attention: normalize(q) @ normalize(k)^T (L2, eps 1e-12) * exp(min(logit_scale, log 100));
- qkv Linear without bias; the bias is concat(q_bias, zeros (k), v_bias);
- continuous position bias: cpb_mlp (Linear 2->512 + ReLU + Linear 512->heads, no bias) on log-spaced
  relative coordinates (divided by pretrained_window - 1 if set, else window - 1; x8;
  sign * log2(|t| + 1) / log2(8)), gathered with relative_position_index, then 16 * sigmoid;
- PatchMerging: Linear(4C -> 2C, no bias) THEN LayerNorm(2C);
- stochastic depth as v1: x + drop_path1(norm1(attn(x))), timm's default drop_path_rate 0.1.
The coordinate table, index, zero k bias and shift mask (timm's non-persistent buffers) are numpy
constants computed from static ints.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bob_jax.models import init as init_lib
from bob_jax.models.layers import drop_path_or_none, linear
from bob_jax.models.swin import (
    Mlp,
    SwinBase,
    attention_probs,
    layer_norm,
    patch_embed_rules,
    patch_merge,
    relative_position_index,
    residual,
    shifted_window_attention,
    stage_window_sizes,
    to_2tuple,
)
from bob_jax.models.init import trunc_normal

LOGIT_SCALE_MAX = math.log(1.0 / 0.01)
CPB_HIDDEN = 512


@dataclasses.dataclass(frozen=True)
class SwinV2Config:
    img_size: tuple[int, int] = (256, 256)
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "avg"
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: tuple[tuple[int, int], ...] = ((8, 8),) * 4
    mlp_ratio: float = 4.0
    pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0)
    drop_path_rate: float = 0.1  # timm's SwinTransformerV2 default

    @classmethod
    def make(cls, *, img_size=256, window_size=8, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
             pretrained_window_sizes=None, **kw):
        depths = tuple(int(d) for d in depths)
        num_heads = tuple(int(h) for h in num_heads)
        if len(num_heads) != len(depths):
            raise ValueError(f"num_heads {num_heads} needs one entry per stage of depths {depths}")
        if pretrained_window_sizes is None:
            pretrained_window_sizes = (0,) * len(depths)
        pretrained_window_sizes = tuple(int(p) for p in pretrained_window_sizes)
        if len(pretrained_window_sizes) < len(depths):
            raise ValueError(f"pretrained_window_sizes {pretrained_window_sizes} needs one entry per stage")
        return cls(
            img_size=to_2tuple(img_size),
            window_size=stage_window_sizes(window_size, len(depths)),
            depths=depths,
            num_heads=num_heads,
            pretrained_window_sizes=pretrained_window_sizes,
            **kw,
        )

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(int(self.embed_dim * 2**i) for i in range(len(self.depths)))


def _arch(**defaults):
    return lambda **kw: SwinV2Config.make(**{**defaults, **kw})


_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
_PRE12 = dict(pretrained_window_sizes=(12, 12, 12, 6))

ARCHS = {
    "swinv2_tiny_window8_256": _arch(window_size=8, img_size=256, **_T),
    "swinv2_tiny_window16_256": _arch(window_size=16, img_size=256, **_T),
    "swinv2_base_window8_256": _arch(window_size=8, img_size=256, **_B),
    "swinv2_base_window12to16_192to256": _arch(window_size=16, img_size=256, **_B, **_PRE12),
    "swinv2_base_window12to24_192to384": _arch(window_size=24, img_size=384, **_B, **_PRE12),
    "swinv2_large_window12to16_192to256": _arch(window_size=16, img_size=256, **_L, **_PRE12),
    "swinv2_large_window12to24_192to384": _arch(window_size=24, img_size=384, **_L, **_PRE12),
}
ARCH_KWARGS = ("num_classes", "global_pool", "img_size", "window_size", "embed_dim", "depths", "num_heads",
               "patch_size", "mlp_ratio", "pretrained_window_sizes", "in_chans", "drop_path_rate")


@functools.lru_cache(maxsize=None)
def relative_coords_table(win_h: int, win_w: int, pre_h: int, pre_w: int) -> np.ndarray:
    """timm `_make_pair_wise_relative_positions` coordinate table, [(2Wh-1) * (2Ww-1), 2] float32."""
    ch = np.arange(-(win_h - 1), win_h, dtype=np.float32)
    cw = np.arange(-(win_w - 1), win_w, dtype=np.float32)
    table = np.stack(np.meshgrid(ch, cw, indexing="ij"), axis=-1)  # [2Wh-1, 2Ww-1, 2]
    if pre_h > 0:
        div = (max(pre_h - 1, 1), max(pre_w - 1, 1))
    else:
        div = (max(win_h - 1, 1), max(win_w - 1, 1))
    table[..., 0] /= np.float32(div[0])
    table[..., 1] /= np.float32(div[1])
    table *= np.float32(8)
    table = np.sign(table) * np.log2(np.abs(table) + np.float32(1.0)) / np.float32(math.log2(8))
    table = table.astype(np.float32).reshape(-1, 2)
    table.setflags(write=False)
    return table


class WindowAttentionV2(nnx.Module):
    def __init__(self, dim: int, num_heads: int, window: tuple[int, int], pretrained_window: tuple[int, int],
                 *, rngs):
        self.num_heads = num_heads
        self.window = window
        self.pretrained_window = pretrained_window
        self.logit_scale = nnx.Param(jnp.zeros((num_heads, 1, 1), jnp.float32))
        # timm nn.Sequential(Linear, ReLU, Linear): keys cpb_mlp.0 and cpb_mlp.2.
        self.cpb_mlp = nnx.List(
            [linear(2, CPB_HIDDEN, rngs=rngs), None, linear(CPB_HIDDEN, num_heads, bias=False, rngs=rngs)]
        )
        self.qkv = linear(dim, 3 * dim, bias=False, rngs=rngs)
        self.q_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.v_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.proj = linear(dim, dim, rngs=rngs)

    def rel_pos_bias(self):
        table = jnp.asarray(relative_coords_table(*self.window, *self.pretrained_window))
        table = self.cpb_mlp[2](jax.nn.relu(self.cpb_mlp[0](table)))  # [(2Wh-1)(2Ww-1), H]
        n = self.window[0] * self.window[1]
        idx = relative_position_index(*self.window).reshape(-1)
        bias = table[idx].reshape(n, n, self.num_heads).transpose(2, 0, 1)
        return 16.0 * jax.nn.sigmoid(bias)

    def __call__(self, x, mask=None):
        b_, n, c = x.shape
        q_bias = self.q_bias[...]
        bias = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), self.v_bias[...]])  # k bias is a zero buffer
        qkv = (self.qkv(x) + bias).reshape(b_, n, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]

        def l2n(t):  # F.normalize(dim=-1): t / max(||t||, 1e-12)
            return t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12)

        attn = l2n(q) @ jnp.swapaxes(l2n(k), -2, -1)
        attn = attn * jnp.exp(jnp.minimum(self.logit_scale[...], LOGIT_SCALE_MAX))
        attn = attention_probs(attn, self.rel_pos_bias(), mask, self.num_heads).astype(v.dtype)
        x = (attn @ v).transpose(0, 2, 1, 3).reshape(b_, n, -1)
        return self.proj(x)


class SwinTransformerV2Block(nnx.Module):
    def __init__(self, dim, num_heads, window, shift, mlp_ratio, pretrained_window, drop_path=0.0,
                 stream=0, *, rngs):
        self.window, self.shift = window, shift
        self.attn = WindowAttentionV2(dim, num_heads, window, pretrained_window, rngs=rngs)
        self.norm1 = layer_norm(dim, rngs=rngs)
        self.drop_path1 = drop_path_or_none(drop_path, 2 * stream)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs)
        self.norm2 = layer_norm(dim, rngs=rngs)
        self.drop_path2 = drop_path_or_none(drop_path, 2 * stream + 1)

    def __call__(self, x, key=None):
        y = self.norm1(shifted_window_attention(x, self.attn, self.window, self.shift))
        x = residual(x, y, self.drop_path1, key)
        return residual(x, self.norm2(self.mlp(x)), self.drop_path2, key)


class PatchMergingV2(nnx.Module):
    def __init__(self, dim: int, out_dim: int, *, rngs):
        self.reduction = linear(4 * dim, out_dim, bias=False, rngs=rngs)
        self.norm = layer_norm(out_dim, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.reduction(patch_merge(x)))


class SwinTransformerV2(SwinBase):
    def __init__(self, cfg: SwinV2Config, *, rngs: nnx.Rngs):
        def block(i, dim, heads, window, shift, drop_path, stream, *, rngs):
            pre = to_2tuple(cfg.pretrained_window_sizes[i])
            return SwinTransformerV2Block(dim, heads, window, shift, cfg.mlp_ratio, pre, drop_path, stream,
                                          rngs=rngs)

        self._build(cfg, block, PatchMergingV2, rngs=rngs)


def init_rules(cfg: SwinV2Config) -> list[tuple[str, init_lib.InitFn]]:
    """timm `SwinTransformerV2.init_weights`: every Linear (incl. cpb_mlp and head) trunc_normal(.02)
    with zero bias; logit_scale log(10); q/v bias zero; the blocks' post-norms norm1/norm2 weight AND
    bias zero (`_init_respostnorm`); other LayerNorms 1/0; patch conv torch default."""
    return patch_embed_rules(cfg) + [
        (r"layers\.\d+\.blocks\.\d+\.norm[12]\.(scale|bias)", init_lib.zeros),
        (r".*logit_scale", lambda rng, shape, dtype: np.full(shape, math.log(10), dtype)),
        (r".*(qkv|proj|fc1|fc2|reduction|head\.fc|cpb_mlp\.[02])\.kernel", trunc_normal(0.02)),
        (r".*norm\d?\.scale", init_lib.ones),
        (r".*(\.bias|q_bias|v_bias)", init_lib.zeros),
    ]
