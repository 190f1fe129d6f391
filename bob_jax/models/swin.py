"""Swin Transformer v1 (timm `swin_transformer.py`) in Flax NNX.

Layout and numerics follow timm 1.0.31 exactly (porting.md sections 4 and 15 item 6):
- `patch_embed` = Conv p x p / p (bias) + LayerNorm; activations stay NHWC throughout.
- `layers.{1,2,3}.downsample` = PatchMerging at the START of stages 1..3 (timm's current layout):
  2x2 neighbours concatenated as (h0w0, h1w0, h0w1, h1w1) -> LayerNorm(4C) -> Linear(4C -> 2C, no bias).
- Block (pre-norm): x + attn(norm1(x)), x + mlp(norm2(x)); every norm is torch LayerNorm, eps 1e-5;
  exact-erf GELU.
- Window attention: q * hd^-0.5 @ k^T + relative position bias (table gathered with the constant
  relative_position_index) [+ the -100 shift mask] -> softmax (f32) -> @ v -> proj.
- Window/shift per block are fixed at construction from `img_size` (timm `_calc_window_shift`: a stage
  whose resolution is <= the window uses window = resolution and no shift); the v1 bias table's shape
  depends on that clamped window. Shifted blocks roll by -shift, THEN pad to a window multiple (timm's
  order; mmdet pads first), partition, attend, reverse, crop, roll back.
- The shift mask is built from the padded shape of the actual input at trace time, so an input of
  `img_size` gives timm's static mask exactly and another size behaves like timm's
  `dynamic_img_size=True` (same windows, mask rebuilt for the new shape).
- Head: final `norm` -> global pool over H, W -> `head.fc`.
- Stochastic depth: each block's `drop_path1` / `drop_path2` share one rate, rising linearly over all
  blocks (`layers.drop_path_rates`); timm's Swin default `drop_path_rate` is 0.1 (train mode only).

The constants timm keeps in non-persistent buffers (relative_position_index, attn_mask) are computed
here with numpy from static ints (never stored on the module: static attributes must be hashable).
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
from bob_jax.models import layers
from bob_jax.models.layers import (
    POOL_DIM_FACTOR,
    conv2d,
    drop_path_or_none,
    drop_path_rates,
    dropout_key,
    global_pool,
    linear,
    to_2tuple,
)

LN_EPS = 1e-5  # torch.nn.LayerNorm everywhere in Swin / SwinV2
MASK_VALUE = -100.0  # timm/original Swin shift mask value (not -inf)


# ----------------------------------------------------------------------------------------------
# configuration helpers shared with SwinV2
# ----------------------------------------------------------------------------------------------


def stage_window_sizes(window_size, num_stages: int) -> tuple[tuple[int, int], ...]:
    """timm `resolve_stage_window_sizes`: an int or (h, w) for all stages, or one per stage."""
    if not isinstance(window_size, (list, tuple)):
        window_size = (window_size,) * num_stages
    elif len(window_size) == 2 and not isinstance(window_size[0], (list, tuple)):
        window_size = (window_size,) * num_stages
    if len(window_size) != num_stages:
        raise ValueError(f"expected {num_stages} stage window sizes, got {window_size!r}")
    out = tuple(to_2tuple(w) for w in window_size)
    if not all(w > 0 for ws in out for w in ws):
        raise ValueError(f"window sizes must be positive, got {out}")
    return out


def stage_resolutions(img_size: tuple[int, int], patch_size: int, num_stages: int):
    """Feature resolution inside each stage (after its PatchMerging): grid, then ceil-halved."""
    res = (img_size[0] // patch_size, img_size[1] // patch_size)
    out = []
    for i in range(num_stages):
        if i > 0:
            res = ((res[0] + 1) // 2, (res[1] + 1) // 2)
        out.append(res)
    return tuple(out)


def calc_window_shift(resolution, window, shift) -> tuple[tuple[int, int], tuple[int, int]]:
    """timm `_calc_window_shift` (always_partition=False): clamp the window to the resolution and
    drop the shift in any dimension where the whole map fits into one window."""
    win = tuple(r if r <= w else w for r, w in zip(resolution, window))
    sh = tuple(0 if r <= w else s for r, w, s in zip(resolution, win, shift))
    return win, sh


@functools.lru_cache(maxsize=None)
def relative_position_index(win_h: int, win_w: int) -> np.ndarray:
    """timm `get_relative_position_index`: (dh + Wh-1) * (2Ww-1) + (dw + Ww-1), dh = h_i - h_j."""
    coords = np.stack(np.meshgrid(np.arange(win_h), np.arange(win_w), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :]
    rel = rel.transpose(1, 2, 0).copy()
    rel[:, :, 0] += win_h - 1
    rel[:, :, 1] += win_w - 1
    rel[:, :, 0] *= 2 * win_w - 1
    idx = rel.sum(-1)
    idx.setflags(write=False)
    return idx


def window_partition(x, window: tuple[int, int]):
    """[B, H, W, C] -> [B * nW, wh * ww, C] (windows in row-major order, tokens row-major inside)."""
    b, h, w, c = x.shape
    wh, ww = window
    x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def window_reverse(windows, window: tuple[int, int], h: int, w: int):
    wh, ww = window
    c = windows.shape[-1]
    x = windows.reshape(-1, h // wh, w // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


@functools.lru_cache(maxsize=None)
def shift_attn_mask(hp: int, wp: int, window: tuple[int, int], shift: tuple[int, int]) -> np.ndarray:
    """timm `get_attn_mask` on the padded (hp, wp) map: 3x3 regions per the slices
    (0, -W), (-W, -s), (-s, None); token pairs from different regions get -100. [nW, N, N] float32."""
    img = np.zeros((1, hp, wp, 1), np.float32)
    cnt = 0
    for hs in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for ws in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            img[:, hs[0] : hs[1], ws[0] : ws[1], :] = cnt
            cnt += 1
    win = np.asarray(window_partition(img, window))[..., 0]  # [nW, N]
    diff = win[:, None, :] - win[:, :, None]
    mask = np.where(diff != 0, np.float32(MASK_VALUE), np.float32(0.0)).astype(np.float32)
    mask.setflags(write=False)
    return mask


def layer_norm(dim: int, *, rngs) -> nnx.LayerNorm:
    return layers.layer_norm(dim, eps=LN_EPS, rngs=rngs)


def gelu(x):
    return jax.nn.gelu(x, approximate=False)


def shifted_window_attention(x, attn_fn, window: tuple[int, int], shift: tuple[int, int]):
    """timm `_attn`: roll by -shift, pad bottom/right to a window multiple, attend per window
    (adding the -100 mask when shifted), merge, crop, roll back."""
    b, h, w, c = x.shape
    has_shift = any(shift)
    if has_shift:
        x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
    pad_h = (window[0] - h % window[0]) % window[0]
    pad_w = (window[1] - w % window[1]) % window[1]
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    mask = jnp.asarray(shift_attn_mask(hp, wp, window, shift)) if has_shift else None
    out = attn_fn(window_partition(x, window), mask)
    x = window_reverse(out, window, hp, wp)[:, :h, :w, :]
    if has_shift:
        x = jnp.roll(x, shift, axis=(1, 2))
    return x


def attention_probs(attn, bias, mask, num_heads: int):
    """attn [B_, H, N, N] + bias [H, N, N] (+ mask [nW, N, N]) -> softmax in float32."""
    attn = attn + bias[None]
    if mask is not None:
        n = attn.shape[-1]
        nw = mask.shape[0]
        attn = attn.reshape(-1, nw, num_heads, n, n) + mask[None, :, None].astype(attn.dtype)
        attn = attn.reshape(-1, num_heads, n, n)
    return jax.nn.softmax(attn.astype(jnp.float32), axis=-1)


def patch_merge(x):
    """Pad odd H/W (bottom/right), then [B, H/2, W/2, 4C] in timm's order: reshape (B, H/2, 2, W/2, 2, C)
    -> permute (0, 1, 3, 4, 2, 5) -> flatten, i.e. channel block k = 2 * w_offset + h_offset
    (= x0 h0w0, x1 h1w0, x2 h0w1, x3 h1w1 of the original code)."""
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    h, w = x.shape[1], x.shape[2]
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)
    return x.reshape(b, h // 2, w // 2, 4 * c)


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SwinConfig:
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "avg"
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: tuple[tuple[int, int], ...] = ((7, 7),) * 4
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1  # timm's SwinTransformer default

    @classmethod
    def make(cls, *, img_size=224, window_size=7, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), **kw):
        depths = tuple(int(d) for d in depths)
        num_heads = tuple(int(h) for h in num_heads)
        if len(num_heads) != len(depths):
            raise ValueError(f"num_heads {num_heads} needs one entry per stage of depths {depths}")
        return cls(
            img_size=to_2tuple(img_size),
            window_size=stage_window_sizes(window_size, len(depths)),
            depths=depths,
            num_heads=num_heads,
            **kw,
        )

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(int(self.embed_dim * 2**i) for i in range(len(self.depths)))


def _arch(**defaults):
    return lambda **kw: SwinConfig.make(**{**defaults, **kw})


ARCHS = {
    "swin_tiny_patch4_window7_224": _arch(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2),
                                          num_heads=(3, 6, 12, 24)),
    "swin_base_patch4_window7_224": _arch(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2),
                                          num_heads=(4, 8, 16, 32)),
}
ARCH_KWARGS = ("num_classes", "global_pool", "img_size", "window_size", "embed_dim", "depths", "num_heads",
               "patch_size", "mlp_ratio", "in_chans", "drop_path_rate")


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------


class PatchEmbed(nnx.Module):
    def __init__(self, in_chans: int, dim: int, patch: int, *, rngs):
        self.proj = conv2d(in_chans, dim, patch, stride=patch, padding=((0, 0), (0, 0)), bias=True, rngs=rngs)
        self.norm = layer_norm(dim, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.proj(x))


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs):
        self.fc1 = linear(dim, hidden, rngs=rngs)
        self.fc2 = linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        return self.fc2(gelu(self.fc1(x)))


class WindowAttention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, window: tuple[int, int], *, rngs):
        self.num_heads = num_heads
        self.window = window
        self.scale = (dim // num_heads) ** -0.5
        n_rel = (2 * window[0] - 1) * (2 * window[1] - 1)
        self.relative_position_bias_table = nnx.Param(jnp.zeros((n_rel, num_heads), jnp.float32))
        self.qkv = linear(dim, 3 * dim, rngs=rngs)
        self.proj = linear(dim, dim, rngs=rngs)

    def rel_pos_bias(self):
        n = self.window[0] * self.window[1]
        idx = relative_position_index(*self.window).reshape(-1)
        bias = self.relative_position_bias_table[...][idx].reshape(n, n, self.num_heads)
        return bias.transpose(2, 0, 1)  # [H, N, N]

    def __call__(self, x, mask=None):
        b_, n, c = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ jnp.swapaxes(k, -2, -1)
        attn = attention_probs(attn, self.rel_pos_bias(), mask, self.num_heads).astype(v.dtype)
        x = (attn @ v).transpose(0, 2, 1, 3).reshape(b_, n, -1)
        return self.proj(x)


def residual(x, y, drop_path, key):
    """x + drop_path(y): the residual add of every Swin block (drop_path None: rate 0)."""
    return x + (y if drop_path is None else drop_path(y, key))


class SwinTransformerBlock(nnx.Module):
    def __init__(self, dim, num_heads, window, shift, mlp_ratio, drop_path=0.0, stream=0, *, rngs):
        self.window, self.shift = window, shift
        self.norm1 = layer_norm(dim, rngs=rngs)
        self.attn = WindowAttention(dim, num_heads, window, rngs=rngs)
        self.drop_path1 = drop_path_or_none(drop_path, 2 * stream)
        self.norm2 = layer_norm(dim, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs)
        self.drop_path2 = drop_path_or_none(drop_path, 2 * stream + 1)

    def __call__(self, x, key=None):
        x = residual(x, shifted_window_attention(self.norm1(x), self.attn, self.window, self.shift),
                     self.drop_path1, key)
        return residual(x, self.mlp(self.norm2(x)), self.drop_path2, key)


class PatchMerging(nnx.Module):
    def __init__(self, dim: int, out_dim: int, *, rngs):
        self.norm = layer_norm(4 * dim, rngs=rngs)
        self.reduction = linear(4 * dim, out_dim, bias=False, rngs=rngs)

    def __call__(self, x):
        return self.reduction(self.norm(patch_merge(x)))


class Stage(nnx.Module):
    def __init__(self, downsample, blocks):
        self.downsample = downsample
        self.blocks = nnx.List(blocks)


class ClassifierHead(nnx.Module):
    """timm `ClassifierHead` (pool + fc); only `fc` has parameters (key `head.fc.*`)."""

    def __init__(self, in_features: int, num_classes: int, *, rngs):
        self.fc = linear(in_features, num_classes, rngs=rngs)

    def __call__(self, pooled):
        return self.fc(pooled)


def block_geometry(cfg) -> tuple[tuple[tuple[tuple[int, int], tuple[int, int]], ...], ...]:
    """Per stage, per block: (window, shift) after timm's clamping at `cfg.img_size`."""
    res = stage_resolutions(cfg.img_size, cfg.patch_size, len(cfg.depths))
    out = []
    for i, depth in enumerate(cfg.depths):
        win = cfg.window_size[i]
        half = (win[0] // 2, win[1] // 2)
        shifts = [(0, 0) if b % 2 == 0 else half for b in range(depth)]
        out.append(tuple(calc_window_shift(res[i], win, s) for s in shifts))
    return tuple(out)


class SwinBase(nnx.Module):
    """Stem, stages and head shared by v1 and v2; subclasses say how to build blocks and merges."""

    def _build(self, cfg, block_fn, merge_fn, *, rngs):
        if cfg.global_pool not in POOL_DIM_FACTOR:
            raise ValueError(
                f"global_pool={cfg.global_pool!r} is not supported; use one of {sorted(POOL_DIM_FACTOR)}"
            )
        self.cfg = cfg
        dims = cfg.dims
        self.patch_embed = PatchEmbed(cfg.in_chans, dims[0], cfg.patch_size, rngs=rngs)
        geometry = block_geometry(cfg)
        rates = drop_path_rates(cfg.drop_path_rate, sum(cfg.depths))
        stages = []
        for i, depth in enumerate(cfg.depths):
            down = merge_fn(dims[i - 1], dims[i], rngs=rngs) if i > 0 else None
            first = sum(cfg.depths[:i])  # global index of the stage's first block
            blocks = [block_fn(i, dims[i], cfg.num_heads[i], *geo, rates[first + j], first + j, rngs=rngs)
                      for j, geo in enumerate(geometry[i])]
            stages.append(Stage(down, blocks))
        self.layers = nnx.List(stages)
        self.norm = layer_norm(dims[-1], rngs=rngs)
        self.num_features = dims[-1] * POOL_DIM_FACTOR[cfg.global_pool]
        has_head = cfg.num_classes > 0
        self.head = ClassifierHead(self.num_features, cfg.num_classes, rngs=rngs) if has_head else None
        self._feature_info = tuple((cfg.patch_size * 2**i, d) for i, d in enumerate(dims))

    @property
    def feature_info(self) -> dict[int, int]:
        """Stride -> channels of each map in `out['features']`."""
        return dict(self._feature_info)

    def __call__(self, x, *, intermediates: bool = False, rngs: nnx.Rngs | None = None):
        """`rngs` (`nnx.Rngs(dropout=key)`) drives stochastic depth in train mode; eval ignores it."""
        key = dropout_key(rngs)
        x = self.patch_embed(x)
        inter = {"patch_embed": x}
        features = {}
        for i, stage in enumerate(self.layers):
            if stage.downsample is not None:
                x = stage.downsample(x)
                inter[f"layers.{i}.downsample"] = x
            for b, block in enumerate(stage.blocks):
                x = block(x, key)
                inter[f"layers.{i}.blocks.{b}"] = x
            features[self._feature_info[i][0]] = x
        pooled = global_pool(self.norm(x), self.cfg.global_pool)
        out = {"pooled": pooled, "features": features}
        if self.head is not None:
            out["logits"] = self.head(pooled)
        if intermediates:
            out["intermediates"] = inter
        return out


class SwinTransformer(SwinBase):
    def __init__(self, cfg: SwinConfig, *, rngs: nnx.Rngs):
        def block(i, dim, heads, window, shift, drop_path, stream, *, rngs):
            return SwinTransformerBlock(dim, heads, window, shift, cfg.mlp_ratio, drop_path, stream,
                                        rngs=rngs)

        self._build(cfg, block, PatchMerging, rngs=rngs)


# ----------------------------------------------------------------------------------------------
# timm random init
# ----------------------------------------------------------------------------------------------


def patch_embed_rules(cfg) -> list[tuple[str, init_lib.InitFn]]:
    """PatchEmbed's conv keeps PyTorch's default init in both Swin versions (timm's init only touches
    Linear layers): U(+-1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / math.sqrt(cfg.in_chans * cfg.patch_size**2)
    fn = init_lib.uniform_symmetric(lambda shape: bound)
    return [(r"patch_embed\.proj\.(kernel|bias)", fn)]


def init_rules(cfg: SwinConfig) -> list[tuple[str, init_lib.InitFn]]:
    """timm `init_weights_vit_timm` (mode ''): every Linear init_lib.trunc_normal(.02) with zero bias; the
    relative position bias tables init_lib.trunc_normal(.02); LayerNorms 1/0; patch conv torch default."""
    return patch_embed_rules(cfg) + [
        (r".*relative_position_bias_table", init_lib.trunc_normal(0.02)),
        (r".*(qkv|proj|fc1|fc2|reduction|head\.fc)\.kernel", init_lib.trunc_normal(0.02)),
        (r".*norm\d?\.scale", init_lib.ones),
        (r".*\.bias", init_lib.zeros),
    ]
