"""EVA-02 ViTs (timm `Eva`, `eva02_*_patch14_*`) in Flax NNX.

Source: timm `timm/models/eva.py` (`Eva`, `EvaBlock`, `EvaAttention`) with `GluMlp` / `SwiGLU` from
`timm/layers/mlp.py` and `RotaryEmbeddingCat` from `timm/layers/pos_embed_sincos.py`; paper
arXiv:2303.11331. Attribute names mirror timm's module tree, so the key table
(`bob_jax.convert.eva`) is near identity.

What distinguishes the variants (porting.md section 8, 14b, 15 item 8):
- EVA-02-S: one fused `qkv` Linear without bias plus separate `q_bias` / `v_bias` parameters (the k
  bias is a zero buffer); packed SwiGLU (`GluMlp`: `fc1` -> [gate | x] halves, `silu(gate) * x`).
- EVA-02-B/L: separate `q_proj` / `k_proj` / `v_proj` (no k bias); split SwiGLU (`fc1_g`, `fc1_x`)
  with a sub-LayerNorm `mlp.norm` before `fc2` (`scale_mlp`).
- 2-D rotary embedding on the patch tokens only (the cls token is skipped), interleaved pairs,
  h-frequencies then w-frequencies, positions rescaled to `ref_feat_shape` (16x16 = 224/14).
- `global_pool='avg'` (the default): no final `norm`, mean over patch tokens then `fc_norm`.
  `'token'`: final `norm`, cls token. LayerNorm eps 1e-6 everywhere, no layer scale.
- Stochastic depth: block i's `drop_path1` / `drop_path2` use `drop_path_rate * i / (depth - 1)`.
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
from bob_jax.models.layers import conv2d, drop_path_or_none, drop_path_rates, dropout_key, linear, to_2tuple

LN_EPS = 1e-6
POOLS = ("avg", "max", "avgmax", "token")


@dataclasses.dataclass(frozen=True)
class EvaConfig:
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 14
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "avg"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4 * 2 / 3
    qkv_fused: bool = True
    swiglu_mlp: bool = True
    scale_mlp: bool = False
    use_rot_pos_emb: bool = True
    ref_feat_shape: tuple[int, int] | None = (16, 16)
    drop_path_rate: float = 0.0

    @classmethod
    def make(cls, **kw) -> EvaConfig:
        """Normalise timm-style arguments (ints or pairs) into the frozen config."""
        if "img_size" in kw:
            kw["img_size"] = to_2tuple(kw["img_size"])
        if "patch_size" in kw:
            ph, pw = to_2tuple(kw["patch_size"])
            if ph != pw:
                raise ValueError(f"only square patches are supported, got patch_size={kw['patch_size']!r}")
            kw["patch_size"] = ph
        if kw.get("ref_feat_shape") is not None:
            kw["ref_feat_shape"] = to_2tuple(kw["ref_feat_shape"])
        return cls(**kw)

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)  # timm: int(dim * mlp_ratio), e.g. L: 2730


def _preset(img: int, embed_dim: int, depth: int, num_heads: int, b_or_l: bool, num_classes: int):
    def factory(**kw):
        args = dict(
            img_size=img, patch_size=14, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16),
            qkv_fused=not b_or_l, scale_mlp=b_or_l, num_classes=num_classes,
        )
        args.update(kw)
        return EvaConfig.make(**args)

    return factory


# timm's default num_classes per arch comes from its default tag: 0 for the MIM (224) archs.
ARCHS = {
    "eva02_small_patch14_224": _preset(224, 384, 12, 6, False, 0),
    "eva02_base_patch14_224": _preset(224, 768, 12, 12, True, 0),
    "eva02_large_patch14_224": _preset(224, 1024, 24, 16, True, 0),
    "eva02_small_patch14_336": _preset(336, 384, 12, 6, False, 1000),
    "eva02_base_patch14_448": _preset(448, 768, 12, 12, True, 1000),
    "eva02_large_patch14_448": _preset(448, 1024, 24, 16, True, 1000),
}
ARCH_KWARGS = (
    "num_classes", "global_pool", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
    "qkv_fused", "swiglu_mlp", "scale_mlp", "use_rot_pos_emb", "ref_feat_shape", "in_chans", "drop_path_rate",
)


def _layer_norm(dim: int, rngs) -> nnx.LayerNorm:
    return layers.layer_norm(dim, eps=LN_EPS, rngs=rngs)


@functools.lru_cache(maxsize=32)
def rope_table(grid: tuple[int, int], head_dim: int, ref_feat_shape: tuple[int, int] | None) -> np.ndarray:
    """timm `RotaryEmbeddingCat(in_pixels=False).get_embed()`: [N, 2 * head_dim] = [sin | cos].

    Bands 1 / 10000^(i / nb), nb = head_dim // 4; index grid t = arange(s) (rescaled t / s * ref);
    'ij' meshgrid; per token [h bands, w bands] then each value repeated twice (interleaved pairs).
    Float32 throughout, like timm's non-persistent buffer.
    """
    nb = head_dim // 4
    exp = np.arange(nb, dtype=np.float32) / np.float32(nb)
    bands = (np.float32(1.0) / (np.float32(10000.0) ** exp)).astype(np.float32)
    ts = []
    for i, s in enumerate(grid):
        t = np.arange(s, dtype=np.float32)
        if ref_feat_shape is not None:
            t = (t / np.float32(s) * np.float32(ref_feat_shape[i])).astype(np.float32)
        ts.append(t)
    mesh = np.stack(np.meshgrid(*ts, indexing="ij"), axis=-1)  # [H, W, 2]
    pos = (mesh[..., None] * bands).astype(np.float32)  # [H, W, 2, nb]
    n = grid[0] * grid[1]
    sin = np.repeat(np.sin(pos).reshape(n, 2 * nb), 2, axis=-1)
    cos = np.repeat(np.cos(pos).reshape(n, 2 * nb), 2, axis=-1)
    return np.concatenate([sin, cos], axis=-1).astype(np.float32)


def _rotate_pairs(x):
    """timm `rot`: [x0, x1, x2, x3] -> [-x1, x0, -x3, x2]."""
    return jnp.stack([-x[..., 1::2], x[..., ::2]], axis=-1).reshape(x.shape)


def apply_rope(x, table):
    """x [B, N, H, hd] (patch tokens only), table [N, 2 * hd] = [sin | cos]."""
    sin, cos = jnp.split(jnp.asarray(table)[:, None, :], 2, axis=-1)
    return x * cos + _rotate_pairs(x) * sin


class EvaAttention(nnx.Module):
    def __init__(self, cfg: EvaConfig, *, rngs: nnx.Rngs):
        d = cfg.embed_dim
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv_fused = cfg.qkv_fused
        if cfg.qkv_fused:
            # timm: qkv Linear without bias; bias = cat(q_bias, zeros (non-persistent k_bias), v_bias).
            self.qkv = linear(d, 3 * d, bias=False, rngs=rngs)
            self.q_bias = nnx.Param(jnp.zeros((d,), jnp.float32))
            self.v_bias = nnx.Param(jnp.zeros((d,), jnp.float32))
        else:
            self.q_proj = linear(d, d, rngs=rngs)
            self.k_proj = linear(d, d, bias=False, rngs=rngs)
            self.v_proj = linear(d, d, rngs=rngs)
        self.proj = linear(d, d, rngs=rngs)

    def __call__(self, x, rope):
        b, n, c = x.shape
        h, hd = self.num_heads, self.head_dim
        if self.qkv_fused:
            bias = jnp.concatenate([self.q_bias[...], jnp.zeros_like(self.q_bias[...]), self.v_bias[...]])
            qkv = (self.qkv(x) + bias).reshape(b, n, 3, h, hd)  # timm split order (3, heads, hd)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q = self.q_proj(x).reshape(b, n, h, hd)
            k = self.k_proj(x).reshape(b, n, h, hd)
            v = self.v_proj(x).reshape(b, n, h, hd)
        if rope is not None:
            npt = n - rope.shape[0]  # prefix (cls) tokens are not rotated
            q = jnp.concatenate([q[:, :npt], apply_rope(q[:, npt:], rope)], axis=1)
            k = jnp.concatenate([k[:, :npt], apply_rope(k[:, npt:], rope)], axis=1)
        attn = jnp.einsum("bqhd,bkhd->bhqk", q * (hd**-0.5), k)
        attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, c)
        return self.proj(out)


class GluMlp(nnx.Module):
    """timm `GluMlp(act=SiLU, gate_last=False)`: fc1 -> [gate | x] halves -> silu(gate) * x -> fc2."""

    def __init__(self, dim: int, hidden: int, scale_mlp: bool, *, rngs: nnx.Rngs):
        self.fc1 = linear(dim, 2 * hidden, rngs=rngs)
        self.norm = _layer_norm(hidden, rngs) if scale_mlp else None
        self.fc2 = linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        gate, x = jnp.split(self.fc1(x), 2, axis=-1)
        x = jax.nn.silu(gate) * x
        if self.norm is not None:
            x = self.norm(x)
        return self.fc2(x)


class SwiGLU(nnx.Module):
    """timm `SwiGLU`: silu(fc1_g(x)) * fc1_x(x) -> sub-LN `norm` (B/L) -> fc2."""

    def __init__(self, dim: int, hidden: int, scale_mlp: bool, *, rngs: nnx.Rngs):
        self.fc1_g = linear(dim, hidden, rngs=rngs)
        self.fc1_x = linear(dim, hidden, rngs=rngs)
        self.norm = _layer_norm(hidden, rngs) if scale_mlp else None
        self.fc2 = linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.silu(self.fc1_g(x)) * self.fc1_x(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.fc2(x)


class Mlp(nnx.Module):
    """timm `Mlp` (swiglu_mlp=False): fc1 -> exact GELU -> optional `norm` -> fc2."""

    def __init__(self, dim: int, hidden: int, scale_mlp: bool, *, rngs: nnx.Rngs):
        self.fc1 = linear(dim, hidden, rngs=rngs)
        self.norm = _layer_norm(hidden, rngs) if scale_mlp else None
        self.fc2 = linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.gelu(self.fc1(x), approximate=False)
        if self.norm is not None:
            x = self.norm(x)
        return self.fc2(x)


class EvaBlock(nnx.Module):
    def __init__(self, cfg: EvaConfig, drop_path: float = 0.0, index: int = 0, *, rngs: nnx.Rngs):
        d = cfg.embed_dim
        self.norm1 = _layer_norm(d, rngs)
        self.attn = EvaAttention(cfg, rngs=rngs)
        self.drop_path1 = drop_path_or_none(drop_path, 2 * index)
        self.norm2 = _layer_norm(d, rngs)
        if not cfg.swiglu_mlp:
            mlp_cls = Mlp
        elif cfg.scale_mlp:
            mlp_cls = SwiGLU  # timm switches to the split-weight SwiGLU when the sub-LN is on
        else:
            mlp_cls = GluMlp
        self.mlp = mlp_cls(d, cfg.mlp_hidden, cfg.scale_mlp, rngs=rngs)
        self.drop_path2 = drop_path_or_none(drop_path, 2 * index + 1)

    def __call__(self, x, rope, key=None):
        y = self.attn(self.norm1(x), rope)
        x = x + (y if self.drop_path1 is None else self.drop_path1(y, key))
        y = self.mlp(self.norm2(x))
        return x + (y if self.drop_path2 is None else self.drop_path2(y, key))


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: EvaConfig, *, rngs: nnx.Rngs):
        p = cfg.patch_size
        self.proj = conv2d(
            cfg.in_chans, cfg.embed_dim, p, stride=p, padding=((0, 0), (0, 0)), bias=True, rngs=rngs
        )

    def __call__(self, x):
        return self.proj(x)


class Eva(nnx.Module):
    def __init__(self, cfg: EvaConfig, *, rngs: nnx.Rngs):
        if cfg.global_pool not in POOLS:
            raise ValueError(
                f"global_pool={cfg.global_pool!r} is not supported for EVA-02; use one of {POOLS}"
            )
        if cfg.embed_dim % cfg.num_heads:
            raise ValueError(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
        if cfg.use_rot_pos_emb and cfg.head_dim % 4:
            raise ValueError(f"rotary embedding needs head_dim divisible by 4, got {cfg.head_dim}")
        self.cfg = cfg
        d = cfg.embed_dim
        gh, gw = cfg.grid_size
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, d), jnp.float32))
        self.pos_embed = nnx.Param(jnp.zeros((1, 1 + gh * gw, d), jnp.float32))
        rates = drop_path_rates(cfg.drop_path_rate, cfg.depth)
        self.blocks = nnx.List([EvaBlock(cfg, rates[i], i, rngs=rngs) for i in range(cfg.depth)])
        # timm: fc_norm after pooling with 'avg', final `norm` otherwise (the other is Identity).
        use_fc_norm = cfg.global_pool == "avg"
        self.norm = None if use_fc_norm else _layer_norm(d, rngs)
        self.fc_norm = _layer_norm(d, rngs) if use_fc_norm else None
        self.head = linear(d, cfg.num_classes, rngs=rngs) if cfg.num_classes > 0 else None
        self.num_features = d
        self._feature_info = ((cfg.patch_size, d),)

    @property
    def feature_info(self) -> dict[int, int]:
        """Stride -> channels of each map in `out['features']`."""
        return dict(self._feature_info)

    def __call__(self, x, *, intermediates: bool = False, rngs: nnx.Rngs | None = None):
        """`rngs` (`nnx.Rngs(dropout=key)`) drives stochastic depth in train mode; eval ignores it."""
        key = dropout_key(rngs)
        cfg = self.cfg
        b, h, w, _ = x.shape
        if (h, w) != cfg.img_size:
            raise ValueError(
                f"EVA-02 has a fixed input size {cfg.img_size} (learned pos_embed); got {(h, w)}. "
                f"Build the model with img_size=({h}, {w}) instead."
            )
        gh, gw = cfg.grid_size
        d = cfg.embed_dim
        x = self.patch_embed(x).reshape(b, gh * gw, d)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)
        rope = rope_table(cfg.grid_size, cfg.head_dim, cfg.ref_feat_shape) if cfg.use_rot_pos_emb else None
        inter = {}
        for i, block in enumerate(self.blocks):
            x = block(x, rope, key)
            if intermediates:
                inter[f"blocks.{i}"] = {"cls": x[:, 0], "patch": x[:, 1:].reshape(b, gh, gw, d)}
        features = {cfg.patch_size: x[:, 1:].reshape(b, gh, gw, d)}
        if self.norm is not None:
            x = self.norm(x)
        if cfg.global_pool == "token":
            pooled = x[:, 0]
        else:
            patches = x[:, 1:]
            if cfg.global_pool == "avg":
                pooled = jnp.mean(patches, axis=1)
            elif cfg.global_pool == "max":
                pooled = jnp.max(patches, axis=1)
            else:  # avgmax
                pooled = 0.5 * (jnp.max(patches, axis=1) + jnp.mean(patches, axis=1))
        if self.fc_norm is not None:
            pooled = self.fc_norm(pooled)
        out = {"pooled": pooled, "features": features}
        if self.head is not None:
            out["logits"] = self.head(pooled)
        if intermediates:
            out["intermediates"] = inter
        return out


def init_rules(cfg: EvaConfig) -> list[tuple[str, init_lib.InitFn]]:
    """timm `Eva.init_weights` at construction: Linear init_lib.trunc_normal(.02) + zero bias; patch-embed conv
    keeps PyTorch's default (kaiming-uniform a=sqrt(5) -> U(+-1/sqrt(fan_in)), bias likewise);
    cls_token / pos_embed init_lib.trunc_normal(.02); q/v biases zero; LayerNorm 1/0; `fix_init_weight`
    divides each block's attn.proj and mlp.fc2 weights by sqrt(2 * (layer_id + 1)); the head is
    init_lib.trunc_normal(.02) * head_init_scale (0.001), bias 0. (`GluMlp/SwiGLU.init_weights` is not called.)"""
    fan_in = cfg.patch_size * cfg.patch_size * cfg.in_chans
    bound = 1.0 / math.sqrt(fan_in)
    rules = [
        (r"patch_embed\.proj\.kernel", init_lib.uniform_symmetric(lambda s: bound)),
        (r"patch_embed\.proj\.bias", init_lib.uniform_symmetric(lambda s: bound)),
        (r"(cls_token|pos_embed)", init_lib.trunc_normal(0.02)),
        (r"head\.kernel", init_lib.trunc_normal(0.02 * 0.001)),
    ]
    for i in range(cfg.depth):
        std = 0.02 / math.sqrt(2.0 * (i + 1))
        rules.append((rf"blocks\.{i}\.(attn\.proj|mlp\.fc2)\.kernel", init_lib.trunc_normal(std)))
    return rules + [
        (r".*\.kernel", init_lib.trunc_normal(0.02)),
        (r".*\.scale", init_lib.ones),
        (r".*\.(bias|q_bias|v_bias)", init_lib.zeros),
    ]
