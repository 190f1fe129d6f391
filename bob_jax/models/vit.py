"""Vision Transformer (timm `VisionTransformer`) in Flax NNX: ViT/AugReg, DeiT, DINO, MAE, CLIP towers,
DINOv2 (layer scale, registers, SwiGLU) and MoCo v3.

Source: timm `timm/models/vision_transformer.py` (1.0.31). Attribute names mirror timm's module
tree (`patch_embed.proj`, `cls_token`, `reg_token`, `pos_embed`, `norm_pre`, `blocks.i.{norm1, attn.qkv,
attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}`, `norm`, `fc_norm`, `head`), so the converter
table (`bob_jax.convert.vit`) is near-identity. Conventions written out: per-model LayerNorm eps
(1e-6 timm, 1e-5 CLIP) with two-pass variance; exact-erf GELU or QuickGELU; the fused `qkv` Linear
split as (3, heads, head_dim); softmax in float32; tokens in row-major (h, w) order.

Token assembly (`VisionTransformer._pos_embed`): `no_embed_class=False`: concat [cls, reg, patches],
then add `pos_embed` (which has slots for the prefix tokens); `no_embed_class=True` (DINOv2 reg4):
add `pos_embed` to the patches, then concat [cls, reg, patches].

Stochastic depth: block i's `drop_path1` / `drop_path2` use rate `drop_path_rate * i / (depth - 1)`
(timm's linspace), in train mode only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bob_jax.models import init as init_lib
from bob_jax.models import pos_embed as pos_embed_lib
from bob_jax.models.layers import drop_path_or_none, drop_path_rates, dropout_key, to_2tuple

ACT_LAYERS = ("gelu", "quick_gelu")
MLP_LAYERS = ("mlp", "swiglu_packed")
GLOBAL_POOLS = ("token", "avg", "max", "avgmax")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "token"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    pre_norm: bool = False
    fc_norm: bool | None = None
    init_values: float | None = None
    act_layer: str = "gelu"
    mlp_layer: str = "mlp"
    norm_eps: float = 1e-6  # timm LayerNorm; CLIP towers use torch's 1e-5 (not a timm kwarg: fixed per arch)
    dynamic_img_size: bool = False
    drop_path_rate: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool={self.global_pool!r} is not supported; use one of {GLOBAL_POOLS}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs the class token (class_token=True)")
        if self.act_layer not in ACT_LAYERS:
            raise ValueError(f"act_layer={self.act_layer!r} is not supported; use one of {ACT_LAYERS}")
        if self.mlp_layer not in MLP_LAYERS:
            raise ValueError(f"mlp_layer={self.mlp_layer!r} is not supported; use one of {MLP_LAYERS}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def grid_size(self) -> tuple[int, int]:
        # timm PatchEmbed: a stride-p conv without padding, so a remainder of the image is dropped.
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool in ("avg", "avgmax", "max") if self.fc_norm is None else bool(self.fc_norm)

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


def _arch(**fixed):
    def factory(**kw):
        if "act_layer" in kw:
            kw["act_layer"] = _act_name(kw["act_layer"])
        if "mlp_layer" in kw:
            kw["mlp_layer"] = _mlp_name(kw["mlp_layer"])
        return ViTConfig(**{**fixed, **kw})

    return factory


def _act_name(act) -> str:
    """Accept timm's string names (and the torch classes timm's DINOv2-g uses, for completeness)."""
    if isinstance(act, str):
        return act.replace("quickgelu", "quick_gelu")
    raise ValueError(f"act_layer must be one of {ACT_LAYERS} (a string), got {act!r}")


def _mlp_name(mlp) -> str:
    if isinstance(mlp, str):
        return mlp
    # timm's SwiGLUPacked is functools.partial(GluMlp, act_layer=nn.SiLU, gate_last=False).
    func, kws = getattr(mlp, "func", None), getattr(mlp, "keywords", {})
    if getattr(func, "__name__", "") == "GluMlp" and kws.get("gate_last") is False:
        return "swiglu_packed"
    if getattr(mlp, "__name__", "") == "Mlp":
        return "mlp"
    raise ValueError(f"mlp_layer must be one of {MLP_LAYERS}, got {mlp!r}")


_CLIP = dict(pre_norm=True, norm_eps=1e-5)
_DINOV2 = dict(patch_size=14, img_size=518, init_values=1e-5, num_classes=0)
_REG4 = dict(reg_tokens=4, no_embed_class=True)
_GIANT = dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2, mlp_layer="swiglu_packed")

# Defaults (incl. num_classes) are those timm.create_model(arch) gives: its default tag's pretrained_cfg.
ARCHS = {
    "vit_small_patch16_224": _arch(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": _arch(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": _arch(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "deit_small_patch16_224": _arch(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "deit_base_patch16_224": _arch(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "deit_base_patch16_384": _arch(img_size=384, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch16_clip_224": _arch(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_CLIP),
    "vit_large_patch14_clip_224": _arch(patch_size=14, embed_dim=1024, depth=24, num_heads=16, **_CLIP),
    "vit_base_patch16_clip_quickgelu_224": _arch(
        patch_size=16, embed_dim=768, depth=12, num_heads=12, act_layer="quick_gelu", num_classes=512,
        **_CLIP),
    "vit_large_patch14_clip_quickgelu_224": _arch(
        patch_size=14, embed_dim=1024, depth=24, num_heads=16, act_layer="quick_gelu", num_classes=768,
        **_CLIP),
    "vit_small_patch14_dinov2": _arch(embed_dim=384, depth=12, num_heads=6, **_DINOV2),
    "vit_base_patch14_dinov2": _arch(embed_dim=768, depth=12, num_heads=12, **_DINOV2),
    "vit_large_patch14_dinov2": _arch(embed_dim=1024, depth=24, num_heads=16, **_DINOV2),
    "vit_giant_patch14_dinov2": _arch(**_DINOV2, **_GIANT),
    "vit_small_patch14_reg4_dinov2": _arch(embed_dim=384, depth=12, num_heads=6, **_DINOV2, **_REG4),
    "vit_base_patch14_reg4_dinov2": _arch(embed_dim=768, depth=12, num_heads=12, **_DINOV2, **_REG4),
    "vit_large_patch14_reg4_dinov2": _arch(embed_dim=1024, depth=24, num_heads=16, **_DINOV2, **_REG4),
    "vit_giant_patch14_reg4_dinov2": _arch(**_DINOV2, **_GIANT, **_REG4),
}
# The keyword arguments timm.create_model accepts for these models that we implement.
ARCH_KWARGS = (
    "num_classes", "in_chans", "global_pool", "img_size", "patch_size", "embed_dim", "depth", "num_heads",
    "mlp_ratio", "qkv_bias", "class_token", "reg_tokens", "no_embed_class", "pre_norm", "fc_norm",
    "init_values", "act_layer", "mlp_layer", "dynamic_img_size", "drop_path_rate",
)


# Parameters are created as zeros, never from `rngs`: weights always come from `init_rules` or a
# checkpoint, and under `nnx.eval_shape` every `rngs.params()` call costs ~10-20 ms (jax formats a
# tracer-origin message per key split), which made building ViT-g abstractly take 7 s instead of 1 s.


class Dense(nnx.Module):
    """`torch.nn.Linear` twin with `nnx.Linear`'s parameter names: kernel [in, out], bias [out]."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True):
        self.kernel = nnx.Param(jnp.zeros((in_features, out_features), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if bias else None
        self.dtype = None  # compute dtype (`backbones.set_compute_dtype`); None: the parameters'

    def __call__(self, x):
        dtype = self.dtype or self.kernel[...].dtype
        y = jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype))
        return y + self.bias[...].astype(dtype) if self.bias is not None else y


class LayerNorm(nnx.Module):
    """`torch.nn.LayerNorm` over the last axis (two-pass variance, explicit eps); `nnx.LayerNorm` names."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.eps = eps
        self.dtype = None  # output dtype; statistics are always computed in float32

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        xc = x - mean
        var = jnp.mean(xc * xc, axis=-1, keepdims=True)
        return (xc * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]).astype(dtype)


def layer_norm(dim: int, eps: float, rngs=None) -> LayerNorm:
    return LayerNorm(dim, eps)


def linear(in_features: int, out_features: int, *, bias: bool = True, rngs=None) -> Dense:
    return Dense(in_features, out_features, bias=bias)


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        p = cfg.patch_size
        # CLIP (pre_norm) towers have no patch-embed bias (timm: bias=not pre_norm).
        self.proj = nnx.Conv(cfg.in_chans, cfg.embed_dim, (p, p), strides=(p, p), padding=((0, 0), (0, 0)),
                             use_bias=not cfg.pre_norm, rngs=rngs)

    def __call__(self, x):
        return self.proj(x)  # [B, h, w, D]


class Attention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = linear(dim, dim * 3, bias=qkv_bias, rngs=rngs)
        self.proj = linear(dim, dim, rngs=rngs)

    def __call__(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, N, hd]
        attn = jnp.einsum("bhqd,bhkd->bhqk", q * jnp.asarray(self.scale, q.dtype), k)
        attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bhkd->bhqd", attn, v)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(b, n, c))


def _act(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    return lambda x: jax.nn.gelu(x, approximate=False)


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, act: str, *, rngs: nnx.Rngs):
        self.fc1 = linear(dim, hidden, rngs=rngs)
        self.fc2 = linear(hidden, dim, rngs=rngs)
        self.act = act

    def __call__(self, x):
        return self.fc2(_act(self.act)(self.fc1(x)))


class SwiGLUPacked(nnx.Module):
    """timm `GluMlp(act_layer=SiLU, gate_last=False)`: fc1 packs [gate | value]; silu(gate) * value."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        if hidden % 2:
            raise ValueError(f"SwiGLUPacked needs an even hidden width, got {hidden}")
        self.fc1 = linear(dim, hidden, rngs=rngs)
        self.fc2 = linear(hidden // 2, dim, rngs=rngs)

    def __call__(self, x):
        h = self.fc1(x)
        gate, value = jnp.split(h, 2, axis=-1)
        return self.fc2(jax.nn.silu(gate) * value)


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init_values: float):
        self.gamma = nnx.Param(jnp.full((dim,), init_values, jnp.float32))

    def __call__(self, x):
        return x * self.gamma[...].astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0, index: int = 0, *, rngs: nnx.Rngs):
        d = cfg.embed_dim
        self.norm1 = layer_norm(d, cfg.norm_eps, rngs)
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias, rngs=rngs)
        self.ls1 = LayerScale(d, cfg.init_values) if cfg.init_values else None
        self.drop_path1 = drop_path_or_none(drop_path, 2 * index)
        self.norm2 = layer_norm(d, cfg.norm_eps, rngs)
        if cfg.mlp_layer == "swiglu_packed":
            self.mlp = SwiGLUPacked(d, cfg.mlp_hidden, rngs=rngs)
        else:
            self.mlp = Mlp(d, cfg.mlp_hidden, cfg.act_layer, rngs=rngs)
        self.ls2 = LayerScale(d, cfg.init_values) if cfg.init_values else None
        self.drop_path2 = drop_path_or_none(drop_path, 2 * index + 1)

    @staticmethod
    def _branch(y, ls, drop_path, key):
        y = ls(y) if ls is not None else y
        return y if drop_path is None else drop_path(y, key)

    def __call__(self, x, key=None):
        x = x + self._branch(self.attn(self.norm1(x)), self.ls1, self.drop_path1, key)
        return x + self._branch(self.mlp(self.norm2(x)), self.ls2, self.drop_path2, key)


class VisionTransformer(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, d), jnp.float32)) if cfg.class_token else None
        self.reg_token = nnx.Param(jnp.zeros((1, cfg.reg_tokens, d), jnp.float32)) if cfg.reg_tokens else None
        gh, gw = cfg.grid_size
        embed_len = gh * gw + (0 if cfg.no_embed_class else cfg.num_prefix_tokens)
        self.pos_embed = nnx.Param(jnp.zeros((1, embed_len, d), jnp.float32))
        self.norm_pre = layer_norm(d, cfg.norm_eps, rngs) if cfg.pre_norm else None
        rates = drop_path_rates(cfg.drop_path_rate, cfg.depth)
        self.blocks = nnx.List([Block(cfg, rates[i], i, rngs=rngs) for i in range(cfg.depth)])
        self.norm = layer_norm(d, cfg.norm_eps, rngs) if not cfg.use_fc_norm else None
        self.fc_norm = layer_norm(d, cfg.norm_eps, rngs) if cfg.use_fc_norm else None
        self.head = linear(d, cfg.num_classes, rngs=rngs) if cfg.num_classes > 0 else None
        self.num_features = d
        self._feature_info = ((cfg.patch_size, d),)

    @property
    def feature_info(self) -> dict[int, int]:
        """Stride -> channels of each map in `out['features']` (the last block's patch tokens)."""
        return dict(self._feature_info)

    def _pos_embed(self, x):
        cfg = self.cfg
        b, h, w, d = x.shape
        pos = self.pos_embed[...].astype(x.dtype)
        if (h, w) != cfg.grid_size:
            pos = pos_embed_lib.resample_abs_pos_embed(
                pos, (h, w), cfg.grid_size, 0 if cfg.no_embed_class else cfg.num_prefix_tokens)
        x = x.reshape(b, h * w, d)
        prefix = []
        if self.cls_token is not None:
            prefix.append(jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, d)))
        if self.reg_token is not None:
            prefix.append(jnp.broadcast_to(self.reg_token[...].astype(x.dtype), (b, cfg.reg_tokens, d)))
        if cfg.no_embed_class:
            x = x + pos
            return jnp.concatenate(prefix + [x], axis=1) if prefix else x
        if prefix:
            x = jnp.concatenate(prefix + [x], axis=1)
        return x + pos

    def _split(self, x, h, w):
        cfg = self.cfg
        parts = {}
        if cfg.class_token:
            parts["cls"] = x[:, 0]
        if cfg.reg_tokens:
            parts["reg"] = x[:, int(cfg.class_token): cfg.num_prefix_tokens]
        parts["patch"] = x[:, cfg.num_prefix_tokens:].reshape(x.shape[0], h, w, x.shape[-1])
        return parts

    def _pool(self, x):
        cfg = self.cfg
        if cfg.global_pool == "token":
            return x[:, 0]
        t = x[:, cfg.num_prefix_tokens:]
        if cfg.global_pool == "avg":
            return t.mean(axis=1)
        if cfg.global_pool == "max":
            return t.max(axis=1)
        return 0.5 * (t.max(axis=1) + t.mean(axis=1))  # avgmax

    def __call__(self, x, *, intermediates: bool = False, rngs: nnx.Rngs | None = None):
        """`rngs` (`nnx.Rngs(dropout=key)`) drives stochastic depth in train mode; eval ignores it."""
        key = dropout_key(rngs)
        if not self.cfg.dynamic_img_size and tuple(x.shape[1:3]) != self.cfg.img_size:
            raise ValueError(  # timm's PatchEmbed asserts the same (strict_img_size)
                f"input size {tuple(x.shape[1:3])} does not match img_size {self.cfg.img_size}; build the "
                "model with img_size=... or dynamic_img_size=True"
            )
        x = self.patch_embed(x)
        h, w = x.shape[1], x.shape[2]
        x = self._pos_embed(x)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        inter = {}
        for i, block in enumerate(self.blocks):
            x = block(x, key)
            if intermediates:
                inter[f"blocks.{i}"] = self._split(x, h, w)
        # timm forward_intermediates(indices=1, norm=False): the last block's patch tokens, unnormalised.
        features = {self.cfg.patch_size: self._split(x, h, w)["patch"]}
        if self.norm is not None:
            x = self.norm(x)
        pooled = self._pool(x)
        if self.fc_norm is not None:
            pooled = self.fc_norm(pooled)
        out = {"pooled": pooled, "features": features}
        if self.head is not None:
            out["logits"] = self.head(pooled)
        if intermediates:
            out["intermediates"] = inter
        return out


def _normal(std: float):
    return lambda rng, shape, dtype: (rng.standard_normal(shape) * std).astype(dtype)


def _torch_conv_uniform(rng, shape, dtype):
    """PyTorch's default Conv2d init (kaiming_uniform a=sqrt(5)): U(+-1/sqrt(fan_in)); HWIO kernel."""
    kh, kw, cin, _ = shape
    return rng.uniform(-1, 1, shape).astype(dtype) / np.sqrt(kh * kw * cin).astype(dtype)


def _glu_fc1(kind: str):
    """GluMlp.init_weights after the timm Linear init: the value half (second) of fc1 near zero weight
    (std 1e-6), bias one; the gate half keeps trunc_normal(.02) / zero bias."""

    def init(rng, shape, dtype):
        if kind == "kernel":
            out = np.clip(rng.standard_normal(shape) * 0.02, -2.0, 2.0)
            half = shape[-1] // 2
            out[..., half:] = rng.standard_normal(out[..., half:].shape) * 1e-6
        else:
            out = np.zeros(shape)
            out[shape[0] // 2:] = 1.0
        return out.astype(dtype)

    return init


def init_rules(cfg: ViTConfig) -> list[tuple[str, init_lib.InitFn]]:
    """timm default `weight_init=''` (`init_weights_vit_timm`): Linear trunc_normal(.02) / zero bias,
    pos_embed trunc_normal(.02), cls/reg tokens normal(1e-6), LayerNorm 1/0, layer scale `init_values`,
    patch-embed conv at PyTorch's default init."""
    fan_in = cfg.in_chans * cfg.patch_size ** 2
    rules = []
    if cfg.mlp_layer == "swiglu_packed":
        rules += [(r"blocks\.\d+\.mlp\.fc1\.kernel", _glu_fc1("kernel")),
                  (r"blocks\.\d+\.mlp\.fc1\.bias", _glu_fc1("bias"))]
    if cfg.init_values:
        iv = float(cfg.init_values)
        rules.append((r"blocks\.\d+\.ls[12]\.gamma", lambda rng, shape, dtype: np.full(shape, iv, dtype)))
    return rules + [
        (r"patch_embed\.proj\.kernel", _torch_conv_uniform),
        (r"patch_embed\.proj\.bias", init_lib.torch_linear_bias(fan_in)),
        (r"pos_embed", init_lib.trunc_normal(0.02)),
        (r"(cls|reg)_token", _normal(1e-6)),
        (r"(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])|head)\.kernel", init_lib.trunc_normal(0.02)),
        (r".*norm.*\.scale", init_lib.ones),
        (r".*\.bias", init_lib.zeros),
    ]
