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
  tokens (M clamped to the resolution like timm): qkv + proj 4 L C^2, attention 2 L M^2 C, MLP
  8 L C^2; patch merging L' 4C 2C; SwinV2 adds its continuous-position-bias MLP
  (2M-1)^2 (2*512 + 512 heads) per block.
- ConvNeXt: stem 4x4/4 conv; per block depthwise 7x7 (49 r^2 C) + MLP 8 r^2 C^2; 2x2/2 downsample
  convs between stages; linear head.

ResNet-50 at 224: 4.11 GMACs = 8.2 GFLOPs; ViT-B/16: 17.57 GMACs; both match timm's published counts.
"""

from __future__ import annotations

import math
from typing import Any


def _conv_out(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


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
    return macs + in_ch * cfg.num_classes


def _head(cfg, dim: int) -> int:
    return dim * cfg.num_classes if cfg.num_classes else 0


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
            rh, rw = rh // 2, rw // 2
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


_BY_FAMILY = {
    "resnet": resnet_macs,
    "vit": vit_macs,
    "eva": eva_macs,
    "swin": swin_macs,
    "swinv2": lambda cfg, h, w: swin_macs(cfg, h, w, v2=True),
    "convnext": convnext_macs,
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
        raise ValueError(f"unknown architecture {arch!r}")
    kwargs = dict(zoo.ZOO[name].default_kwargs()) if name in zoo.ZOO else {}
    kwargs.update(arch_kwargs or {})
    macs = analytic_macs(family.name, family.config(arch, kwargs), size)
    return None if macs is None else 2 * macs / 1e9


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
