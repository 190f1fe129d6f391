"""Plain ViTs adapted for detection (ViTDet): window attention, a few global blocks, decomposed relative
positions, no class token, a stride-16 map for the simple feature pyramid (`necks.SimpleFeaturePyramid`).

Sources: detectron2 `detectron2/modeling/backbone/{vit,utils}.py` (variant "vitdet") and BoB's mmdet
fork `hsouri/bob-detection:mmdet/models/backbones/vitdet.py` (class `ViTdet`, variant "bob"); porting.md
section 12.1. Attribute names follow detectron2's `ViT` (`patch_embed.proj`, `pos_embed`,
`blocks.i.{norm1, attn.qkv, attn.proj, attn.rel_pos_h, attn.rel_pos_w, norm2, mlp.fc1, mlp.fc2}`), so a
converter for detectron2/SAM checkpoints is near identity; DINOv2's layer scale keeps timm's names
(`blocks.i.ls1.gamma`, `ls2.gamma`), CLIP's `norm_pre` too.

Forward (both variants): patch embed -> + absolute pos-embed (its grid resized to the input's grid with
PyTorch's bicubic kernel, A = -0.75, align_corners=False, no antialias; prefix slots dropped) -> [norm_pre]
-> blocks -> [final norm] -> {"features": {patch: NHWC}}. A block is
`x + drop_path(ls1(attn(norm1(x))))`, `x + drop_path(ls2(mlp(norm2(x))))`; in a window block the LN output
is zero-padded at the bottom/right to a multiple of the window, partitioned into windows (padded tokens
take part in attention: no mask), and cropped back after attention. Relative positions (MViTv2
decomposed): logits[q, k] += q_vec . R_h[qh - kh] + q_vec . R_w[qw - kw], tables [2S - 1, head_dim] with
S the attention span (window, or the full grid in a global block), zero-initialised, resized linearly
(PyTorch `F.interpolate(mode='linear')`) when the span differs from the table.

Variants (`ViTDetConfig.variant`):
- "vitdet" (detectron2): global blocks at fixed indices (B/S 2,5,8,11; L 5,11,17,23; H 7,15,23,31),
  relative terms use the *unscaled* q (detectron2 passes q, not q * scale, to add_decomposed_rel_pos),
  no final norm, `pos_embed` kept at the pre-training grid (with its class-token slot, as
  `pretrain_use_cls_token`) and resized in every forward, so fine-tuning updates the pre-training grid.
- "bob" (BoB's `ViTdet`): every third block global (`(i + 1) % 3 == 0`: 2,5,8,11,...), relative terms
  use the *scaled* q (`q = q * scale` before `calc_rel_pos_spatial`), the final LayerNorm (eps 1e-6) is
  kept (the checkpoint's `norm`), `pos_embed` resized once to the detection grid when the weights are
  loaded (BoB's `load_checkpoint`) and stored there without a class slot.

Patch-14 models (DINOv2): `from_vit(..., patch_size=16)` (default) resizes the patch kernel 14 -> 16 as
EVA-02's "p14to16" checkpoints do (`patch_resize="bicubic"`: `F.interpolate(kernel, 16, bicubic,
align_corners=False)`, which scales the kernel's sum by about (16/14)^2, so token norms grow ~1.3x before
the first LayerNorm; fine-tuning absorbs it), or with `patch_resize="pi"` timm's / FlexiViT's
pseudo-inverse resize (`resample_patch_embed`: <resize(x), w'> = <x, w> for bicubic-antialiased
resized patches), which keeps a frozen trunk's statistics. The feature stride is then 16 and the
pyramid yields strides 4..32. `patch_size=None` keeps 14 (stride-14 map; the pyramid's strides would be
3.5/7/14/28, which `SimpleFeaturePyramid` rejects because anchors and RoI levels assume powers of two).
DINOv2 register tokens are dropped with the class token (they have no place in window attention).

EVA-02 (`bob_jax/models/eva.py`) has its own trunk in `bob_jax/detection/eva02det.py`
(`Eva02DetBackbone.from_eva`, after `EVA-02/det/detectron2/modeling/backbone/vit.py`): SwiGLU MLPs with
sub-LN (`mlp.ffn_ln`), separate q/k/v projections without k bias, 2-D RoPE on q and k in every block
with two tables (window blocks: `pt_seq_len=16`, `ft_seq_len=window`; global blocks: `ft_seq_len=img/patch`),
the p14to16 patch and pos-embed resize, window 16 at 1024 with 4 global blocks; rel-pos off. It reuses
this module's windows, resizes and `lr_decay_layer_id`. `from_vit` rejects EVA models with this pointer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bob_jax.convert import abstract_leaves, load_leaves
from bob_jax.models import pos_embed as pos_embed_lib
from bob_jax.models import vit as vit_lib
from bob_jax.models.layers import drop_path_or_none, drop_path_rates, dropout_key, to_2tuple

VARIANTS = ("vitdet", "bob")
PATCH_RESIZES = ("bicubic", "pi")
# detectron2 projects/ViTDet COCO configs (porting.md 12.1): the blocks outside window_block_indexes.
VITDET_GLOBAL_BLOCKS = {12: (2, 5, 8, 11), 24: (5, 11, 17, 23), 32: (7, 15, 23, 31)}
BOB_GLOBAL_INTERVAL = 3


def default_global_blocks(variant: str, depth: int) -> tuple[int, ...]:
    """0-based indices of the global-attention blocks of `variant` for a ViT of `depth` blocks."""
    if variant == "bob":
        return tuple(i for i in range(depth) if (i + 1) % BOB_GLOBAL_INTERVAL == 0)
    if variant == "vitdet":
        if depth not in VITDET_GLOBAL_BLOCKS:
            raise ValueError(f"detectron2 ViTDet defines global blocks for depths {sorted(VITDET_GLOBAL_BLOCKS)}, "
                             f"not {depth}; pass global_blocks=... explicitly")
        return VITDET_GLOBAL_BLOCKS[depth]
    raise ValueError(f"variant={variant!r} is not supported; use one of {VARIANTS}")


# ----------------------------------------------------------------------------------------------
# PyTorch-exact resizing (numpy matrices, applied in numpy or in-graph)
# ----------------------------------------------------------------------------------------------


def resize_pos_embed_bicubic_torch(grid, new_size: Sequence[int]):
    """Resize a [..., H, W, C] grid like `F.interpolate(nchw, size=new_size, mode="bicubic",
    align_corners=False)` (antialias=False): Keys cubic A = -0.75, source `(dst + 0.5) * in / out - 0.5`,
    border taps clamped. Not `jax.image.resize` (its cubic is A = -0.5 with antialiasing when
    downsampling: 0.3 max error on a 14 -> 64 pos-embed). Works on numpy or JAX arrays."""
    return pos_embed_lib.resample_grid(grid, tuple(int(s) for s in new_size), antialias=False)


@functools.lru_cache(maxsize=64)
def linear_interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix of `F.interpolate(mode="linear", align_corners=False)` (size given): source
    `max((dst + 0.5) * in / out - 0.5, 0)`, neighbour index clamped to the last sample. Coordinates in
    float32 as PyTorch's CPU kernel computes them (float64 ones differ from it by up to 3e-5)."""
    m = np.zeros((out_size, in_size), np.float64)
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    for i in range(out_size):
        src = max(scale * (f32(i) + f32(0.5)) - f32(0.5), f32(0.0))
        i0 = int(src)
        i1 = i0 + 1 if i0 < in_size - 1 else i0
        lam = float(src - f32(i0))
        m[i, i0] += 1.0 - lam
        m[i, i1] += lam
    return m


@functools.lru_cache(maxsize=64)
def _rel_pos_gather(size: int, table_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(resize matrix [2S-1, table_len], index [S, S] into the resized table: q - k + S - 1)."""
    coords = np.arange(size)
    return linear_interpolation_matrix(table_len, 2 * size - 1), coords[:, None] - coords[None, :] + size - 1


def get_rel_pos(size: int, table):
    """detectron2 `get_rel_pos(q_size=size, k_size=size, table)`: [size, size, head_dim] embeddings of
    the relative offsets q - k, the table first resized linearly to 2 * size - 1 rows if needed."""
    if table.shape[0] != 2 * size - 1:
        resize, index = _rel_pos_gather(size, table.shape[0])
        table = jnp.dot(jnp.asarray(resize, table.dtype), table, precision="highest")
    else:
        index = _rel_pos_gather(size, table.shape[0])[1]
    return table[index]


def resize_patch_kernel(kernel: np.ndarray, new_patch: int, method: str = "bicubic") -> np.ndarray:
    """Resize a patch-embedding kernel [p, p, in, out] (HWIO) to [new, new, in, out].

    "bicubic": EVA-02's p14to16 (`F.interpolate(w, (new, new), mode="bicubic", align_corners=False)`).
    "pi": timm `resample_patch_embed` (FlexiViT): w' = pinv(R^T) w with R the bicubic-antialiased
    resize of a p x p patch to new x new, so <R x, w'> = <x, w> for every patch x when upsampling.
    """
    kernel = np.asarray(kernel, np.float64)
    p = kernel.shape[0]
    if kernel.shape[1] != p:
        raise ValueError(f"square patch kernels only, got {kernel.shape[:2]}")
    if p == new_patch:
        return kernel.astype(np.float32)
    if method == "bicubic":
        flat = kernel.reshape(p, p, -1)  # resize each (in, out) kernel slice as a channel
        resized = resize_pos_embed_bicubic_torch(flat, (new_patch, new_patch))
        return np.asarray(resized, np.float32).reshape(new_patch, new_patch, *kernel.shape[2:])
    if method == "pi":
        m = pos_embed_lib.interpolation_matrix(p, new_patch, True)
        resize = np.kron(m, m)  # [new*new, p*p], row-major (h, w) flattening
        flat = kernel.reshape(p * p, -1)
        return (np.linalg.pinv(resize.T) @ flat).reshape(new_patch, new_patch, *kernel.shape[2:]).astype(np.float32)
    raise ValueError(f"patch_resize={method!r} is not supported; use one of {PATCH_RESIZES}")


# ----------------------------------------------------------------------------------------------
# windows
# ----------------------------------------------------------------------------------------------


def window_partition(x, window: int):
    """[B, H, W, C] -> ([B * nWh * nWw, window, window, C], (Hp, Wp)): zero-pad bottom/right to a
    multiple of `window`, windows in row-major order (detectron2 `window_partition`)."""
    b, h, w, c = x.shape
    ph, pw = (-h) % window, (-w) % window
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]):
    """Inverse of `window_partition`, cropping the padding: -> [B, H, W, C]."""
    hp, wp = padded_hw
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.reshape(b, hp // window, wp // window, window, window, -1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, -1)[:, : hw[0], : hw[1]]


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ViTDetConfig:
    img_size: tuple[int, int] = (1024, 1024)  # detection input; sets the global blocks' rel-pos tables
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden: int = 3072
    qkv_bias: bool = True
    patch_bias: bool = True
    pre_norm: bool = False
    act_layer: str = "gelu"
    mlp_layer: str = "mlp"
    init_values: float | None = None  # layer scale (DINOv2)
    norm_eps: float = 1e-6
    window_size: int = 14
    global_blocks: tuple[int, ...] = (2, 5, 8, 11)
    use_rel_pos: bool = True
    variant: str = "vitdet"
    pos_embed_grid: tuple[int, int] = (14, 14)  # grid the stored pos_embed lives on
    pos_embed_prefix: int = 1  # leading (class-token) slots of the stored pos_embed, dropped in forward
    drop_path_rate: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        object.__setattr__(self, "pos_embed_grid", to_2tuple(self.pos_embed_grid))
        object.__setattr__(self, "global_blocks", tuple(int(i) for i in self.global_blocks))
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} is not supported; use one of {VARIANTS}")
        bad = [i for i in self.global_blocks if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"global_blocks {bad} are outside 0..{self.depth - 1}")
        if self.window_size < 1:
            raise ValueError(f"window_size must be positive, got {self.window_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def final_norm(self) -> bool:
        return self.variant == "bob"

    @property
    def rel_pos_scaled_q(self) -> bool:
        return self.variant == "bob"


class Attention(nnx.Module):
    """Multi-head self-attention over a [B, H, W, C] map with decomposed relative positions."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, rel_pos_span: tuple[int, int] | None,
                 rel_pos_scaled_q: bool):
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = vit_lib.linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = vit_lib.linear(dim, dim)
        self.rel_pos_scaled_q = rel_pos_scaled_q
        if rel_pos_span is not None:
            self.rel_pos_h = nnx.Param(jnp.zeros((2 * rel_pos_span[0] - 1, self.head_dim), jnp.float32))
            self.rel_pos_w = nnx.Param(jnp.zeros((2 * rel_pos_span[1] - 1, self.head_dim), jnp.float32))
        else:
            self.rel_pos_h = self.rel_pos_w = None

    def __call__(self, x):
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, nh, N, hd]
        q_scaled = q * jnp.asarray(self.scale, q.dtype)
        attn = jnp.einsum("bnqd,bnkd->bnqk", q_scaled, k)
        if self.rel_pos_h is not None:
            r_q = (q_scaled if self.rel_pos_scaled_q else q).reshape(b, self.num_heads, h, w, self.head_dim)
            rh = get_rel_pos(h, self.rel_pos_h[...].astype(q.dtype))  # [h, kh, hd]
            rw = get_rel_pos(w, self.rel_pos_w[...].astype(q.dtype))  # [w, kw, hd]
            rel_h = jnp.einsum("bnhwd,hkd->bnhwk", r_q, rh)
            rel_w = jnp.einsum("bnhwd,wkd->bnhwk", r_q, rw)
            attn = attn.reshape(b, self.num_heads, h, w, h, w)
            attn = attn + rel_h[..., :, None] + rel_w[..., None, :]
            attn = attn.reshape(b, self.num_heads, h * w, h * w)
        attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bnqk,bnkd->bqnd", attn, v).reshape(b, h, w, c)
        return self.proj(out)


class Block(nnx.Module):
    def __init__(self, cfg: ViTDetConfig, index: int, drop_path: float):
        d = cfg.embed_dim
        self.window_size = 0 if index in cfg.global_blocks else cfg.window_size
        span = cfg.grid_size if self.window_size == 0 else (self.window_size, self.window_size)
        self.norm1 = vit_lib.LayerNorm(d, cfg.norm_eps)
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias, span if cfg.use_rel_pos else None,
                              cfg.rel_pos_scaled_q)
        self.ls1 = vit_lib.LayerScale(d, cfg.init_values) if cfg.init_values else None
        self.drop_path1 = drop_path_or_none(drop_path, 2 * index)
        self.norm2 = vit_lib.LayerNorm(d, cfg.norm_eps)
        if cfg.mlp_layer == "swiglu_packed":
            self.mlp = vit_lib.SwiGLUPacked(d, cfg.mlp_hidden, rngs=None)
        else:
            self.mlp = vit_lib.Mlp(d, cfg.mlp_hidden, cfg.act_layer, rngs=None)
        self.ls2 = vit_lib.LayerScale(d, cfg.init_values) if cfg.init_values else None
        self.drop_path2 = drop_path_or_none(drop_path, 2 * index + 1)

    def _attention(self, x):
        if self.window_size == 0:
            return self.attn(x)
        h, w = x.shape[1], x.shape[2]
        windows, padded_hw = window_partition(x, self.window_size)
        return window_unpartition(self.attn(windows), self.window_size, padded_hw, (h, w))

    def __call__(self, x, key=None):
        x = x + vit_lib.Block._branch(self._attention(self.norm1(x)), self.ls1, self.drop_path1, key)
        return x + vit_lib.Block._branch(self.mlp(self.norm2(x)), self.ls2, self.drop_path2, key)


def trunk_geometry(img_size, patch_size: int | None, source_patch: int, patch_resize: str):
    """(patch, (h, w)) of a plain-ViT detection trunk made from a classification model with patch
    `source_patch` (`patch_size=None` keeps it), checked: a known `patch_resize` and an input that the
    patch divides (the trunks do not pad)."""
    if patch_resize not in PATCH_RESIZES:
        raise ValueError(f"patch_resize={patch_resize!r} is not supported; use one of {PATCH_RESIZES}")
    patch = source_patch if patch_size is None else int(patch_size)
    img_size = to_2tuple(img_size)
    if img_size[0] % patch or img_size[1] % patch:
        raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch}; pad the input")
    return patch, img_size


class PlainTrunk(nnx.Module):
    """What every plain-ViT detection trunk shares (ViTDet here, EVA-02 in `eva02det`): one feature map
    at stride `patch_size`, and the stored absolute pos-embed (prefix slots first) put on the input's
    grid. Subclasses set `cfg` (embed_dim, patch_size, pos_embed_grid, pos_embed_prefix),
    `pos_embed` and `_feature_info`."""

    @property
    def feature_info(self) -> dict[int, int]:
        return dict(self._feature_info)

    def abs_pos(self, grid: tuple[int, int], dtype):
        """detectron2 `get_abs_pos`: the stored pos-embed without prefix slots, on `grid`: [1, h, w, D]."""
        cfg = self.cfg
        pos = self.pos_embed[...][:, cfg.pos_embed_prefix:].reshape(1, *cfg.pos_embed_grid, cfg.embed_dim)
        if tuple(grid) != cfg.pos_embed_grid:
            pos = resize_pos_embed_bicubic_torch(pos, grid)
        return pos.astype(dtype)


class ViTDetBackbone(PlainTrunk):
    """ViTDet trunk: NHWC images -> {"features": {patch_size: [B, H/p, W/p, D]}}.

    Build it from a zoo ViT with `ViTDetBackbone.from_vit`; the constructor alone makes zero
    parameters (for `nnx.eval_shape` and checkpoint loading).
    """

    def __init__(self, cfg: ViTDetConfig):
        self.cfg = cfg
        d, p = cfg.embed_dim, cfg.patch_size
        self.patch_embed = _PatchEmbed(cfg.in_chans, d, p, cfg.patch_bias)
        gh, gw = cfg.pos_embed_grid
        self.pos_embed = nnx.Param(jnp.zeros((1, cfg.pos_embed_prefix + gh * gw, d), jnp.float32))
        self.norm_pre = vit_lib.LayerNorm(d, cfg.norm_eps) if cfg.pre_norm else None
        rates = drop_path_rates(cfg.drop_path_rate, cfg.depth)
        self.blocks = nnx.List([Block(cfg, i, rates[i]) for i in range(cfg.depth)])
        self.norm = vit_lib.LayerNorm(d, cfg.norm_eps) if cfg.final_norm else None
        self.num_features = d
        self._feature_info = ((p, d),)

    def __call__(self, x, *, rngs: nnx.Rngs | None = None):
        """`rngs` (`nnx.Rngs(dropout=key)`) drives stochastic depth in train mode; eval ignores it."""
        key = dropout_key(rngs)
        x = self.patch_embed(x)
        x = x + self.abs_pos((x.shape[1], x.shape[2]), x.dtype)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x, key)
        if self.norm is not None:
            x = self.norm(x)
        return {"features": {self.cfg.patch_size: x}}

    @classmethod
    def from_vit(
        cls,
        vit: nnx.Module,
        *,
        img_size: int | tuple[int, int],
        window_size: int = 14,
        global_blocks: Sequence[int] | None = None,
        variant: str = "vitdet",
        drop_path_rate: float = 0.0,
        use_rel_pos: bool = True,
        patch_size: int | None = 16,
        patch_resize: str = "bicubic",
    ) -> ViTDetBackbone:
        """A ViTDet trunk carrying a zoo ViT's trained weights (patch embed, pos-embed, norms, qkv,
        proj, MLP, layer scale); the class/register tokens, head and pooling norms are dropped and
        the relative-position tables start at zero.

        `global_blocks`: None for the variant's default (see module docstring). `patch_size`: the
        trunk's patch (16 resizes a patch-14 kernel by `patch_resize`; None keeps the source's).
        """
        if not isinstance(vit, vit_lib.VisionTransformer):
            raise TypeError(
                f"from_vit needs a bob_jax ViT (bob_jax.models.vit.VisionTransformer), got {type(vit).__name__}; "
                "EVA-02 goes through bob_jax.detection.eva02det.Eva02DetBackbone.from_eva"
            )
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is not supported; use one of {VARIANTS}")
        vcfg: vit_lib.ViTConfig = vit.cfg
        patch, img_size = trunk_geometry(img_size, patch_size, vcfg.patch_size, patch_resize)
        det_grid = (img_size[0] // patch, img_size[1] // patch)
        prefix = 0 if vcfg.no_embed_class else vcfg.num_prefix_tokens
        cfg = ViTDetConfig(
            img_size=img_size, patch_size=patch, in_chans=vcfg.in_chans, embed_dim=vcfg.embed_dim,
            depth=vcfg.depth, num_heads=vcfg.num_heads, mlp_hidden=vcfg.mlp_hidden, qkv_bias=vcfg.qkv_bias,
            patch_bias=not vcfg.pre_norm, pre_norm=vcfg.pre_norm, act_layer=vcfg.act_layer,
            mlp_layer=vcfg.mlp_layer, init_values=vcfg.init_values, norm_eps=vcfg.norm_eps,
            window_size=window_size,
            global_blocks=default_global_blocks(variant, vcfg.depth) if global_blocks is None else global_blocks,
            use_rel_pos=use_rel_pos, variant=variant,
            # vitdet keeps the pre-training grid (resized per forward); bob stores the detection grid.
            pos_embed_grid=vcfg.grid_size if variant == "vitdet" else det_grid,
            pos_embed_prefix=prefix if variant == "vitdet" else 0,
            drop_path_rate=drop_path_rate,
        )
        model = nnx.eval_shape(lambda: cls(cfg))
        leaves = _leaves_from_vit(vit, cfg, prefix, patch_resize)
        # Relative-position tables are new (absent from classification checkpoints): zero, as detectron2.
        leaves.update({k: np.zeros(t.shape, np.float32) for k, t in abstract_leaves(model).items()
                       if ".attn.rel_pos_" in k})
        return load_leaves(model, leaves)


def _leaves_from_vit(vit, cfg: ViTDetConfig, prefix: int, patch_resize: str) -> dict[str, np.ndarray]:
    src = {k: np.asarray(v) for k, v in abstract_leaves(vit).items()}
    out = {}
    for key, value in src.items():
        if key.startswith(("blocks.", "patch_embed.proj.bias", "norm_pre.")):
            out[key] = value
    out["patch_embed.proj.kernel"] = resize_patch_kernel(src["patch_embed.proj.kernel"], cfg.patch_size,
                                                         patch_resize)
    pos = src["pos_embed"]
    if cfg.variant == "bob":  # BoB's load_checkpoint: drop the class slot, resize once to the det grid
        grid = pos[:, prefix:].reshape(1, *vit.cfg.grid_size, cfg.embed_dim)
        pos = np.asarray(resize_pos_embed_bicubic_torch(grid, cfg.pos_embed_grid), np.float32)
        pos = pos.reshape(1, -1, cfg.embed_dim)
    out["pos_embed"] = pos
    if cfg.final_norm:
        # BoB's ViTdet always has `norm`; a checkpoint without one (fc_norm ViTs) leaves it at 1 / 0.
        d = cfg.embed_dim
        out["norm.scale"] = src.get("norm.scale", np.ones((d,), np.float32))
        out["norm.bias"] = src.get("norm.bias", np.zeros((d,), np.float32))
    return out


class _PatchEmbed(nnx.Module):
    def __init__(self, in_chans: int, dim: int, patch: int, bias: bool):
        self.proj = _PatchConv(in_chans, dim, patch, bias)

    def __call__(self, x):
        return self.proj(x)


class _PatchConv(nnx.Module):
    """A stride-p p x p convolution without padding (`nnx.Conv` names: kernel HWIO, bias)."""

    def __init__(self, in_chans: int, dim: int, patch: int, bias: bool):
        self.kernel = nnx.Param(jnp.zeros((patch, patch, in_chans, dim), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32)) if bias else None
        self.patch = patch
        self.dtype = None

    def __call__(self, x):
        dtype = self.dtype or self.kernel[...].dtype
        p = self.patch
        y = jax.lax.conv_general_dilated(
            x.astype(dtype), self.kernel[...].astype(dtype), (p, p), "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias[...].astype(dtype) if self.bias is not None else y


def lr_decay_layer_id(path: str, depth: int) -> int:
    """detectron2 `get_vit_lr_decay_rate` layer id of a ViTDet trunk parameter (dotted NNX path):
    patch_embed / pos_embed 0, blocks.i -> i + 1, anything else (final norm) depth + 1; the lr scale
    is decay ** (depth + 1 - id)."""
    if path.startswith(("patch_embed.", "pos_embed", "norm_pre.")):
        return 0
    if path.startswith("blocks."):
        return int(path.split(".")[1]) + 1
    return depth + 1

