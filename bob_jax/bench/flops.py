"""FLOPs per image: analytic closed forms per family, and XLA's own count of the compiled program.

Convention (timm / fvcore, `shared/docs/performance.md`): count the multiply-accumulates (MACs) of
convolutions, linear layers and the two attention matmuls (QK^T and AV) only -- no norms, activations,
softmax, pooling or position-bias arithmetic -- and report FLOPs = 2 x MACs. A training step costs
about 3x the forward FLOPs (forward + 2x for the backward pass).

Closed forms (N tokens, D width, hidden MLP width h, image H x W, p patch size):
- ResNet (bottleneck, v1.5: stride on the 3x3): stem 7x7/2 conv, then per block conv1 1x1 at the
  input resolution, conv2 3x3 and conv3 1x1 at the output resolution, plus the 1x1 downsample of each
  stage's first block; linear head. Conv output size floor((H + 2 pad - k) / stride) + 1 as in torch.
- ViT / DINOv2 / EVA-02: patch embed (H/p)(W/p) p^2 C_in D; per block qkv + proj 4 N D^2, attention
  2 N^2 D, MLP 2 N D h (GELU MLP), 3 N D h (EVA SwiGLU: two input projections), or N D h + N D h/2
  (timm GluMlp "swiglu_packed", h = packed width); linear head.
- Swin / SwinV2: patch embed 4x4/4 conv; per block on L = r^2 tokens of width C with windows of M^2
  tokens (M clamped to the resolution like timm, the map padded to a window multiple L_p): qkv + proj
  4 L_p C^2, attention 2 L_p M^2 C, MLP 8 L C^2; patch merging L' 4C 2C (r' = ceil(r / 2)); SwinV2
  adds its continuous-position-bias MLP (2M-1)^2 (2*512 + 512 heads) per block.
- ConvNeXt: stem 4x4/4 conv; per block depthwise 7x7 (49 r^2 C) + MLP 8 r^2 C^2; 2x2/2 downsample
  convs between stages; linear head.
- EfficientNet-Lite (TF 'SAME' padding: output side ceil(H / stride)): stem 3x3/2 conv; depthwise-
  separable blocks dw k^2 C + pw C C_out; inverted residuals pw C (eC) at the input resolution, dw
  k^2 (eC) and pwl (eC) C_out at the output resolution; 1x1 conv_head; linear head.
- CLIP ResNet (anti-aliased bottlenecks): three 3x3 stem convs (the first strided) and a 2x2 average
  pool; per block conv1 1x1 and the stride-1 conv2 3x3 at the input resolution, conv3 1x1 after the
  2x2 pool, the shortcut's 1x1 after its (ceil-mode) pool; attention pool over N = r^2 + 1 tokens
  computing only the mean token's output, as bob_jax does: k, v 2 N D^2, q D^2, attention 2 N D,
  then the D x num_classes projection.

ResNet-50 at 224: 4.11 GMACs = 8.2 GFLOPs; ViT-B/16: 17.57 GMACs; both match timm's published counts.
:func:`analytic_gflops` gives the count from a backbone name and input size alone (config only, no
parameters); tests/test_bench.py checks every closed form against the convolutions and matmuls in the
traced jaxpr of the bob_jax model.
"""

from __future__ import annotations

import functools
import math
from typing import Any


def _conv_out(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def _head(cfg, dim: int) -> int:
    """Linear classifier on the pooled features ('catavgmax' pooling doubles their width)."""
    factor = 2 if getattr(cfg, "global_pool", None) == "catavgmax" else 1
    return dim * factor * cfg.num_classes


def resnet_macs(cfg, h: int, w: int) -> float:
    """Bottleneck ResNet (timm `resnet50`/`resnet101`): MACs per image."""
    cin = getattr(cfg, "in_chans", 3)
    h, w = _conv_out(h, 7, 2, 3), _conv_out(w, 7, 2, 3)
    macs = h * w * 49 * cin * 64
    h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)  # max pool
    in_ch = 64
    for stage, n_blocks in enumerate(cfg.layers):
        width = 64 * 2**stage
        out_ch = 4 * width
        for b in range(n_blocks):
            stride = 2 if (b == 0 and stage > 0) else 1
            ho, wo = _conv_out(h, 3, stride, 1), _conv_out(w, 3, stride, 1)
            macs += h * w * in_ch * width  # conv1 1x1
            macs += ho * wo * 9 * width * width  # conv2 3x3 (strided)
            macs += ho * wo * width * out_ch  # conv3 1x1
            if b == 0:
                macs += ho * wo * in_ch * out_ch  # downsample 1x1
            h, w, in_ch = ho, wo, out_ch
    return macs + _head(cfg, in_ch)


def vit_macs(cfg, h: int, w: int) -> float:
    """timm VisionTransformer (incl. DINOv2 / registers)."""
    p, d = cfg.patch_size, cfg.embed_dim
    grid = (h // p) * (w // p)
    n = grid + (1 if cfg.class_token else 0) + cfg.reg_tokens
    hidden = cfg.mlp_hidden
    mlp = n * d * hidden + n * d * (hidden // 2) if cfg.mlp_layer == "swiglu_packed" else 2 * n * d * hidden
    block = 4 * n * d * d + 2 * n * n * d + mlp
    return grid * p * p * cfg.in_chans * d + cfg.depth * block + _head(cfg, d)


def eva_macs(cfg, h: int, w: int) -> float:
    """timm Eva (EVA-02): SwiGLU MLP with separate gate/value projections; RoPE costs no MACs."""
    p, d = cfg.patch_size, cfg.embed_dim
    grid = (h // p) * (w // p)
    n = grid + 1
    hidden = cfg.mlp_hidden
    mlp = 3 * n * d * hidden if cfg.swiglu_mlp else 2 * n * d * hidden
    block = 4 * n * d * d + 2 * n * n * d + mlp
    return grid * p * p * cfg.in_chans * d + cfg.depth * block + _head(cfg, d)


def swin_macs(cfg, h: int, w: int, *, v2: bool = False) -> float:
    p, c = cfg.patch_size, cfg.embed_dim
    rh, rw = h // p, w // p
    macs = rh * rw * p * p * cfg.in_chans * c
    for s, depth in enumerate(cfg.depths):
        if s > 0:
            rh, rw = -(-rh // 2), -(-rw // 2)  # timm pads an odd side before merging 2x2 neighbours
            macs += rh * rw * 4 * c * 2 * c  # patch merging
            c *= 2
        wh, ww = (min(r, m) for r, m in zip((rh, rw), cfg.window_size[s]))
        # timm pads the map to a window multiple before qkv/attention.
        lp = math.ceil(rh / wh) * wh * math.ceil(rw / ww) * ww
        l_tok = rh * rw
        block = 4 * lp * c * c + 2 * lp * wh * ww * c + 2 * l_tok * c * int(c * cfg.mlp_ratio)
        if v2:
            heads = cfg.num_heads[s]
            block += (2 * wh - 1) * (2 * ww - 1) * (2 * 512 + 512 * heads)
        macs += depth * block
    return macs + _head(cfg, c)


def convnext_macs(cfg, h: int, w: int) -> float:
    dims = cfg.dims
    rh, rw = h // 4, w // 4
    macs = rh * rw * 16 * cfg.in_chans * dims[0]
    for s, depth in enumerate(cfg.depths):
        if s > 0:
            rh, rw = rh // 2, rw // 2
            macs += rh * rw * 4 * dims[s - 1] * dims[s]
        c = dims[s]
        macs += depth * (rh * rw * 49 * c + 8 * rh * rw * c * c)
    return macs + _head(cfg, dims[-1])


def efficientnet_macs(cfg, h: int, w: int) -> float:
    """EfficientNet-Lite (timm `tf_efficientnet_lite0`): TF 'SAME' convs, output side ceil(size / stride)."""
    h, w = -(-h // 2), -(-w // 2)
    macs = h * w * 9 * cfg.in_chans * cfg.stem_size
    in_ch = cfg.stem_size
    for spec in cfg.stages:
        for b in range(spec.repeats):
            stride = spec.stride if b == 0 else 1
            ho, wo = -(-h // stride), -(-w // stride)
            k2 = spec.kernel * spec.kernel
            if spec.block == "ds":
                macs += ho * wo * (k2 * in_ch + in_ch * spec.out_ch)
            else:
                mid = in_ch * spec.expand
                macs += h * w * in_ch * mid + ho * wo * (k2 * mid + mid * spec.out_ch)
            h, w, in_ch = ho, wo, spec.out_ch
    macs += h * w * in_ch * cfg.num_features
    return macs + _head(cfg, cfg.num_features)


def clip_resnet_macs(cfg, h: int, w: int) -> float:
    """OpenAI CLIP ResNet (timm `resnet50_clip` ...): 3-conv stem, anti-aliased bottlenecks, attention
    pool."""
    from bob_jax.models.clip_resnet import _make_divisible

    s0, s1, s2 = cfg.stem_chs
    h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
    macs = h * w * 9 * (cfg.in_chans * s0 + s0 * s1 + s1 * s2)
    h, w = h // 2, w // 2  # 2x2 average pool (floor)
    in_ch = s2
    for stage, (depth, out_ch) in enumerate(zip(cfg.layers, cfg.stage_chs)):
        mid = _make_divisible(out_ch * 0.25)
        for b in range(depth):
            stride = 2 if (stage > 0 and b == 0) else 1
            if stride == 2 and (h % 2 or w % 2):
                raise ValueError(
                    f"a CLIP ResNet cannot run this input size: the {h}x{w} map entering stage {stage} is "
                    "odd, so its main path (floor pool) and shortcut (ceil pool) disagree; use a multiple of "
                    "32"
                )
            ho, wo = (h // 2, w // 2) if stride == 2 else (h, w)
            macs += h * w * (in_ch * mid + 9 * mid * mid)  # conv1 1x1, conv2 3x3 (stride in the pool after)
            macs += ho * wo * mid * out_ch  # conv3 1x1
            if stride != 1 or in_ch != out_ch:
                hs, ws = (-(-h // 2), -(-w // 2)) if stride == 2 else (h, w)  # ceil-mode pool
                macs += hs * ws * in_ch * out_ch
            h, w, in_ch = ho, wo, out_ch
    n, d = h * w + 1, in_ch
    macs += 2 * n * d * d + d * d + 2 * n * d  # k, v over all tokens; q, attention for the mean token
    return macs + d * cfg.num_classes


_BY_FAMILY = {
    "resnet": resnet_macs,
    "vit": vit_macs,
    "eva": eva_macs,
    "swin": swin_macs,
    "swinv2": lambda cfg, h, w: swin_macs(cfg, h, w, v2=True),
    "convnext": convnext_macs,
    "efficientnet": efficientnet_macs,
    "clip_resnet": clip_resnet_macs,
}


def analytic_macs(family_name: str, cfg: Any, size: int) -> float | None:
    """MACs per image for a family config at `size` x `size`, or None for families without a formula."""
    fn = _BY_FAMILY.get(family_name)
    return None if fn is None else float(fn(cfg, size, size))


def model_gflops(name: str, size: int, arch_kwargs: dict | None = None) -> float | None:
    """Analytic forward GFLOPs (2 x MACs) per image of backbone `arch.tag` (None: no closed form)."""
    from bob_jax.backbones import zoo

    arch = name.partition(".")[0]
    family = zoo.ARCH_TO_FAMILY.get(arch)
    if family is None:
        raise ValueError(f"unknown architecture {arch!r}; see bob_jax.backbones.list_backbones()")
    kwargs = dict(zoo.ZOO[name].default_kwargs()) if name in zoo.ZOO else {}
    kwargs.update(arch_kwargs or {})
    macs = analytic_macs(family.name, family.config(arch, kwargs), size)
    return None if macs is None else 2 * macs / 1e9


@functools.lru_cache(maxsize=4096)
def analytic_gflops(backbone_name: str, input_size: int, *, num_classes: int = 0) -> float | None:
    """Forward GFLOPs (2 x MACs) per `input_size` x `input_size` image of backbone `arch.tag` (or `arch`).

    The model is counted as bob_jax.battle builds it: the tag's config with `num_classes` (default 0:
    the trunk without classifier) and, for token and window families, `img_size=input_size` (position
    tables resampled, windows clamped). Only the config dataclass is built, no parameters, and results
    are cached, so a report can call it per record. A tag bob_jax does not know falls back to its
    architecture's defaults (the tag changes weights, not the graph). Returns None for a creatable name
    without a closed form (a user-registered backbone); raises ValueError for an unknown architecture or
    a size that is not a positive integer.
    """
    from bob_jax.backbones import zoo

    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0:
        raise ValueError(f"input_size must be a positive integer (pixels per side), got {input_size!r}")
    arch = backbone_name.partition(".")[0]
    family = zoo.ARCH_TO_FAMILY.get(arch)
    if family is None:
        from bob_jax.backbones import list_backbones

        if backbone_name in list_backbones():
            return None
        raise ValueError(
            f"unknown architecture {arch!r} in {backbone_name!r}; see bob_jax.backbones.list_backbones()"
        )
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if "img_size" in family.arch_kwargs:
        kwargs["img_size"] = input_size
    return model_gflops(backbone_name, input_size, kwargs)


def xla_flops(compiled) -> float | None:
    """Total FLOPs XLA's cost model assigns to a compiled program (None when the backend gives none).

    XLA also counts elementwise work (norms, activations, softmax), which raises it above the analytic
    count, but it leaves out the multiplications with a convolution's zero padding, which the
    fvcore convention includes: convnets come out a few per cent lower at 224 px (ResNet-50 on CPU:
    8.0 vs 8.18 GFLOPs) and much lower on tiny inputs, where padding is a large share.
    """
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per computation
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    flops = float(cost["flops"])
    return flops if flops > 0 else None
