"""EVA-02 adapted for detection: the ViTDet trunk of EVA-02's detectron2 fork, fed by our zoo's EVA-02.

Source: `baaivision/EVA`, `EVA-02/det/detectron2/modeling/backbone/{vit.py (ViT, Block, Attention,
SwiGLU), utils.py (VisionRotaryEmbeddingFast, window_partition, get_abs_pos)}` and its COCO configs
`projects/ViTDet/configs/eva2_mim_to_coco/*` (B: 1024 px, window 16, global blocks 2, 5, 8, 11; L: 5,
11, 17, 23). Attribute names follow that module tree (`patch_embed.proj`, `pos_embed`,
`blocks.i.{norm1, attn.{q_proj, k_proj, v_proj, q_bias, v_bias, proj}, norm2, mlp.{w1, w2, ffn_ln, w3}}`),
so a converter for its checkpoints is near identity (torch `weight` -> `kernel` transposed, LayerNorm
`weight` -> `scale`; the `rope_win` / `rope_glb` buffers are recomputed, not loaded).

Forward: patch embed (16x16) -> + absolute pos-embed (stored on the pre-training grid with its class
slot, resized to the input grid with PyTorch's bicubic kernel every forward: detectron2 `get_abs_pos`)
-> blocks -> {"features": {patch: NHWC}}; no final norm, no class token. A block is
`x + drop_path(attn(norm1(x)))`, `x + drop_path(mlp(norm2(x)))`, LayerNorm eps 1e-6, no layer scale
(EVA-02 has none). Window blocks zero-pad the LN output to a multiple of the window, attend inside each
window (padded tokens take part: no mask) and crop back (`vitdet.window_partition`).

Attention: q = x Wq + q_bias, k = x Wk (no k bias), v = x Wv + v_bias; 2-D RoPE on q and k of every
block, then softmax(q k^T / sqrt(head_dim)) v. No relative-position terms: EVA-02's configs pass
`use_rel_pos=True` to its ViT, which ignores it (its Block takes no such argument).

RoPE (`VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len, ft_seq_len)`): bands
1 / 10000^(2i / (head_dim / 2)), i < head_dim / 4; positions t = arange(ft) / ft * pt (the fine-tuning
span squeezed onto the pre-training span); per token [h-angles | w-angles], each angle repeated for an
interleaved pair; x * cos + rotate_pairs(x) * sin. Two tables: window blocks use ft = window (at window
16 with pt 16 the positions are the pre-training integers 0..15), global blocks ft = the input grid
(64 at 1024 px: positions 0, 0.25, ...). `pt` is the classification model's RoPE reference grid
(timm's `ref_feat_shape`, 16 = 224 / 14 for every EVA-02), as EVA-02's `pt_hw_seq_len=16`. The angles are
exactly timm's `RotaryEmbeddingCat` with `ref_feat_shape=(pt, pt)` on a (ft, ft) grid, so
`bob_jax.models.eva.rope_table` computes them. EVA-02 builds the global table once for `img_size`;
here it is built for the grid of the input the trunk sees (the same table at `img_size`, and a
non-square input gets per-axis spans instead of a shape error).

MLP (`SwiGLU(subln=True)`): w3(ffn_ln(silu(w1 x) * w2 x)). From timm's EVA-02: B/L's split `SwiGLU`
maps fc1_g -> w1, fc1_x -> w2, norm -> ffn_ln, fc2 -> w3; S's packed `GluMlp` has `fc1` = [gate | x]
halves (-> w1 | w2) and no sub-LN, so `Eva02DetConfig.subln` follows the source (EVA-02's detection
repo only ships B and L; S gets no `ffn_ln` rather than an untrained one). S's fused `qkv` (no bias, with
`q_bias` / `v_bias`) is split into the three projections.

p14to16 (`from_eva(patch_size=16)`): as EVA-02's `*_p14to16` checkpoints (EVA-02 README: "interpolate
the kernel size of patch_embed from 14x14 to 16x16, and interpolate the pos_embed from 16x16 to 14x14"):
the patch kernel is resized with `vitdet.resize_patch_kernel` (bicubic, or "pi" for timm's pseudo-inverse)
and the pos-embed's patch part goes to the grid of the same pre-training image at the new patch
(224 / 16 = 14: `pretrain_img_size=224`, `pretrain_use_cls_token=True`, [1, 197, D] as in EVA-02's
detection checkpoints), torch-bicubic; the class slot is kept and ignored.

In the `Detector` (`model.py`), the neck variant picks the global blocks as for ViTs ("vitdet":
detectron2's / EVA-02's indices; "bob": every third block) and `DetectorConfig.window_size` the window
(`configs/detection.py` sets EVA-02's 16 under recipe bob).

Layer-wise lr decay uses `vitdet.lr_decay_layer_id` unchanged (EVA-02's `get_vit_lr_decay_rate` is
detectron2's: patch_embed / pos_embed 0, blocks.i i + 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bob_jax.convert import abstract_leaves, load_leaves
from bob_jax.detection import vitdet
from bob_jax.models import eva as eva_lib
from bob_jax.models import vit as vit_lib
from bob_jax.models.layers import drop_path_or_none, drop_path_rates, dropout_key, to_2tuple

LN_EPS = 1e-6
# EVA-02 det configs (eva2_mim_to_coco/*_4attn_1024_*): window 16 at 1024 px.
EVA02_WINDOW = 16


def rope_table(span: tuple[int, int], head_dim: int, pt_seq_len: int) -> np.ndarray:
    """[span_h * span_w, 2 * head_dim] = [sin | cos] of `VisionRotaryEmbeddingFast(head_dim // 2,
    pt_seq_len, ft_seq_len=span)` (per-axis spans; EVA-02's square case has span_h = span_w)."""
    return eva_lib.rope_table(tuple(int(s) for s in span), head_dim, (pt_seq_len, pt_seq_len))


@dataclasses.dataclass(frozen=True)
class Eva02DetConfig:
    img_size: tuple[int, int] = (1024, 1024)  # detection input (recorded; RoPE follows the actual input)
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden: int = 2048  # int(dim * 4 * 2 / 3)
    subln: bool = True  # the MLP's sub-LayerNorm `ffn_ln` (EVA-02-B/L)
    window_size: int = EVA02_WINDOW
    global_blocks: tuple[int, ...] = (2, 5, 8, 11)
    rope_pt_seq_len: int = 16  # EVA-02 `pt_hw_seq_len`: the pre-training RoPE grid
    pos_embed_grid: tuple[int, int] = (14, 14)  # grid the stored pos_embed lives on
    pos_embed_prefix: int = 1  # class-token slot of the stored pos_embed, dropped in forward
    drop_path_rate: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        object.__setattr__(self, "pos_embed_grid", to_2tuple(self.pos_embed_grid))
        object.__setattr__(self, "global_blocks", tuple(int(i) for i in self.global_blocks))
        bad = [i for i in self.global_blocks if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"global_blocks {bad} are outside 0..{self.depth - 1}")
        if self.window_size < 1:
            raise ValueError(f"window_size must be positive, got {self.window_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim divisible by 4 (two axes of rotated pairs), got "
                             f"{self.head_dim}; change embed_dim or num_heads")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)


class Attention(nnx.Module):
    """EVA-02 det `Attention` over a [B, h, w, C] map with the RoPE table of its span."""

    def __init__(self, dim: int, num_heads: int):
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = vit_lib.linear(dim, dim, bias=False)
        self.k_proj = vit_lib.linear(dim, dim, bias=False)
        self.v_proj = vit_lib.linear(dim, dim, bias=False)
        self.q_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.v_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.proj = vit_lib.linear(dim, dim)

    def __call__(self, x, rope):
        b, h, w, c = x.shape
        shape = (b, h * w, self.num_heads, self.head_dim)
        q = (self.q_proj(x) + self.q_bias[...].astype(x.dtype)).reshape(shape)
        k = self.k_proj(x).reshape(shape)
        v = (self.v_proj(x) + self.v_bias[...].astype(x.dtype)).reshape(shape)
        table = jnp.asarray(rope, x.dtype)
        q, k = eva_lib.apply_rope(q, table), eva_lib.apply_rope(k, table)
        attn = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(self.head_dim ** -0.5, q.dtype), k)
        attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)
        return self.proj(jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, h, w, c))


class SwiGLU(nnx.Module):
    """EVA-02 det `SwiGLU`: w3(ffn_ln(silu(w1 x) * w2 x)), `ffn_ln` only with sub-LN."""

    def __init__(self, dim: int, hidden: int, subln: bool):
        self.w1 = vit_lib.linear(dim, hidden)
        self.w2 = vit_lib.linear(dim, hidden)
        self.ffn_ln = vit_lib.LayerNorm(hidden, LN_EPS) if subln else None
        self.w3 = vit_lib.linear(hidden, dim)

    def __call__(self, x):
        x = jax.nn.silu(self.w1(x)) * self.w2(x)
        if self.ffn_ln is not None:
            x = self.ffn_ln(x)
        return self.w3(x)


class Block(nnx.Module):
    def __init__(self, cfg: Eva02DetConfig, index: int, drop_path: float):
        d = cfg.embed_dim
        self.window_size = 0 if index in cfg.global_blocks else cfg.window_size
        self.norm1 = vit_lib.LayerNorm(d, LN_EPS)
        self.attn = Attention(d, cfg.num_heads)
        self.drop_path1 = drop_path_or_none(drop_path, 2 * index)
        self.norm2 = vit_lib.LayerNorm(d, LN_EPS)
        self.mlp = SwiGLU(d, cfg.mlp_hidden, cfg.subln)
        self.drop_path2 = drop_path_or_none(drop_path, 2 * index + 1)

    def _attention(self, x, tables):
        if self.window_size == 0:
            return self.attn(x, tables["global"])
        h, w = x.shape[1], x.shape[2]
        windows, padded_hw = vitdet.window_partition(x, self.window_size)
        out = self.attn(windows, tables["window"])
        return vitdet.window_unpartition(out, self.window_size, padded_hw, (h, w))

    def __call__(self, x, tables, key=None):
        x = x + vit_lib.Block._branch(self._attention(self.norm1(x), tables), None, self.drop_path1, key)
        return x + vit_lib.Block._branch(self.mlp(self.norm2(x)), None, self.drop_path2, key)


class Eva02DetBackbone(vitdet.PlainTrunk):
    """EVA-02 ViTDet trunk: NHWC images -> {"features": {patch_size: [B, H/p, W/p, D]}}.

    Build it from a zoo EVA-02 with `Eva02DetBackbone.from_eva`; the constructor alone makes zero
    parameters (for `nnx.eval_shape` and checkpoint loading).
    """

    def __init__(self, cfg: Eva02DetConfig):
        self.cfg = cfg
        d, p = cfg.embed_dim, cfg.patch_size
        self.patch_embed = vitdet._PatchEmbed(cfg.in_chans, d, p, True)
        gh, gw = cfg.pos_embed_grid
        self.pos_embed = nnx.Param(jnp.zeros((1, cfg.pos_embed_prefix + gh * gw, d), jnp.float32))
        rates = drop_path_rates(cfg.drop_path_rate, cfg.depth)
        self.blocks = nnx.List([Block(cfg, i, rates[i]) for i in range(cfg.depth)])
        self.num_features = d
        self._feature_info = ((p, d),)

    def rope_tables(self, grid: tuple[int, int]) -> dict[str, np.ndarray]:
        """{"window": EVA-02's `rope_win` (ft = window), "global": `rope_glb` (ft = the input grid)}."""
        cfg = self.cfg
        window = (cfg.window_size, cfg.window_size)
        return {"window": rope_table(window, cfg.head_dim, cfg.rope_pt_seq_len),
                "global": rope_table(tuple(grid), cfg.head_dim, cfg.rope_pt_seq_len)}

    def __call__(self, x, *, rngs: nnx.Rngs | None = None):
        """`rngs` (`nnx.Rngs(dropout=key)`) drives stochastic depth in train mode; eval ignores it."""
        key = dropout_key(rngs)
        x = self.patch_embed(x)
        grid = (x.shape[1], x.shape[2])
        x = x + self.abs_pos(grid, x.dtype)
        tables = self.rope_tables(grid)
        for block in self.blocks:
            x = block(x, tables, key)
        return {"features": {self.cfg.patch_size: x}}

    @classmethod
    def from_eva(
        cls,
        eva: nnx.Module,
        *,
        img_size: int | tuple[int, int],
        window_size: int = EVA02_WINDOW,
        global_blocks: Sequence[int] | None = None,
        drop_path_rate: float = 0.0,
        patch_size: int | None = 16,
        patch_resize: str = "bicubic",
    ) -> Eva02DetBackbone:
        """An EVA-02 det trunk carrying a zoo EVA-02's trained weights (patch embed, pos-embed, norms,
        q/k/v, proj, SwiGLU); the class token, fc_norm / norm and head are dropped.

        `global_blocks`: None for detectron2's / EVA-02's indices (`vitdet.default_global_blocks`,
        "vitdet" rule: depth 12 -> 2, 5, 8, 11; 24 -> 5, 11, 17, 23). `patch_size`: the trunk's patch (16
        resizes the patch-14 kernel by `patch_resize` and the pos-embed to the pre-training image's
        16-pixel grid, EVA-02's p14to16; None keeps 14).
        """
        if not isinstance(eva, eva_lib.Eva):
            raise TypeError(f"from_eva needs a bob_jax EVA-02 (bob_jax.models.eva.Eva), got {type(eva).__name__}; "
                            "plain ViTs go through vitdet.ViTDetBackbone.from_vit")
        ecfg: eva_lib.EvaConfig = eva.cfg
        if not (ecfg.use_rot_pos_emb and ecfg.swiglu_mlp):
            raise ValueError("EVA-02's detection trunk has RoPE and SwiGLU in every block; this EVA was built "
                             f"with use_rot_pos_emb={ecfg.use_rot_pos_emb}, swiglu_mlp={ecfg.swiglu_mlp}")
        patch, img_size = vitdet.trunk_geometry(img_size, patch_size, ecfg.patch_size, patch_resize)
        ref = ecfg.ref_feat_shape or ecfg.grid_size  # timm without ref_feat_shape: integer positions
        if ref[0] != ref[1]:
            raise ValueError(f"EVA-02's RoPE has one pre-training span for both axes; got ref_feat_shape={ref}")
        cfg = Eva02DetConfig(
            img_size=img_size, patch_size=patch, in_chans=ecfg.in_chans, embed_dim=ecfg.embed_dim,
            depth=ecfg.depth, num_heads=ecfg.num_heads, mlp_hidden=ecfg.mlp_hidden, subln=ecfg.scale_mlp,
            window_size=window_size,
            global_blocks=(vitdet.default_global_blocks("vitdet", ecfg.depth) if global_blocks is None
                           else global_blocks),
            rope_pt_seq_len=int(ref[0]),
            # p14to16: the same pre-training image on the new patch grid (224 / 16 = 14)
            pos_embed_grid=(ecfg.img_size[0] // patch, ecfg.img_size[1] // patch),
            pos_embed_prefix=1, drop_path_rate=drop_path_rate,
        )
        model = nnx.eval_shape(lambda: cls(cfg))
        return load_leaves(model, _leaves_from_eva(eva, cfg, patch_resize))


def _leaves_from_eva(eva, cfg: Eva02DetConfig, patch_resize: str) -> dict[str, np.ndarray]:
    src = {k: np.asarray(v) for k, v in abstract_leaves(eva).items()}
    d = cfg.embed_dim
    out = {
        "patch_embed.proj.kernel": vitdet.resize_patch_kernel(src["patch_embed.proj.kernel"], cfg.patch_size,
                                                              patch_resize),
        "patch_embed.proj.bias": src["patch_embed.proj.bias"],
    }
    pos = src["pos_embed"]
    grid = eva.cfg.grid_size
    if grid != cfg.pos_embed_grid:
        patches = pos[:, 1:].reshape(1, *grid, d)
        patches = np.asarray(vitdet.resize_pos_embed_bicubic_torch(patches, cfg.pos_embed_grid), np.float32)
        pos = np.concatenate([pos[:, :1], patches.reshape(1, -1, d)], axis=1)
    out["pos_embed"] = pos
    for i in range(cfg.depth):
        out.update(_block_leaves(src, f"blocks.{i}.", d, cfg.mlp_hidden, cfg.subln))
    return out


def _block_leaves(src: dict[str, np.ndarray], p: str, d: int, hidden: int, subln: bool) -> dict[str, np.ndarray]:
    """One block's leaves under prefix `p`, timm EVA names -> EVA-02 det names."""
    out = {p + n: src[p + n] for n in ("norm1.scale", "norm1.bias", "norm2.scale", "norm2.bias",
                                        "attn.proj.kernel", "attn.proj.bias")}
    if p + "attn.qkv.kernel" in src:  # EVA-02-S: fused qkv, output features ordered (q, k, v)
        qkv = src[p + "attn.qkv.kernel"]
        q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
        q_bias, v_bias = src[p + "attn.q_bias"], src[p + "attn.v_bias"]
    else:  # B/L: separate projections, k without bias
        q, k, v = (src[p + f"attn.{n}_proj.kernel"] for n in "qkv")
        q_bias, v_bias = src[p + "attn.q_proj.bias"], src[p + "attn.v_proj.bias"]
    out.update({p + "attn.q_proj.kernel": q, p + "attn.k_proj.kernel": k, p + "attn.v_proj.kernel": v,
                p + "attn.q_bias": q_bias, p + "attn.v_bias": v_bias})
    if p + "mlp.fc1.kernel" in src:  # GluMlp: fc1 -> [gate | x] halves
        w, b = src[p + "mlp.fc1.kernel"], src[p + "mlp.fc1.bias"]
        out.update({p + "mlp.w1.kernel": w[:, :hidden], p + "mlp.w1.bias": b[:hidden],
                    p + "mlp.w2.kernel": w[:, hidden:], p + "mlp.w2.bias": b[hidden:]})
    else:  # SwiGLU: fc1_g (gate) -> w1, fc1_x -> w2
        for new, old in (("w1", "fc1_g"), ("w2", "fc1_x")):
            out[p + f"mlp.{new}.kernel"] = src[p + f"mlp.{old}.kernel"]
            out[p + f"mlp.{new}.bias"] = src[p + f"mlp.{old}.bias"]
    if subln:
        out[p + "mlp.ffn_ln.scale"], out[p + "mlp.ffn_ln.bias"] = src[p + "mlp.norm.scale"], src[p + "mlp.norm.bias"]
    out[p + "mlp.w3.kernel"], out[p + "mlp.w3.bias"] = src[p + "mlp.fc2.kernel"], src[p + "mlp.fc2.bias"]
    return out
