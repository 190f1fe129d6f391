"""Detection necks: maps {stride: NHWC} from a backbone -> {"p2".."p6": NHWC} at strides 4..64.

- `FPN` (detectron2 `modeling/backbone/fpn.py`, hierarchical backbones: ResNet, ConvNeXt, Swin/SwinV2,
  EfficientNet): per input stride a lateral 1x1 conv to `out_channels`, a top-down path (nearest x2
  upsample of the coarser merged map + add), a 3x3 output conv (pad 1); p6 = max-pool kernel 1 stride 2
  of p5 (`LastLevelMaxPool`, mmdet `add_extra_convs=False`). Convs have a bias without norm, none with
  norm="LN"; weights `c2_xavier_fill` (kaiming-uniform a=1: U(+-sqrt(3 / fan_in))), bias 0. Names
  `fpn_lateral{stage}`, `fpn_output{stage}` (stage = log2 stride), as detectron2.
- `SimpleFeaturePyramid(variant="vitdet")` (detectron2 `vit.py`, porting.md 12.2): from the stride-16
  map, scale 4 = ConvT 2x2/2 (D -> D/2) -> LN -> GELU -> ConvT (D/2 -> D/4); 2 = ConvT (D -> D/2); 1 =
  identity; 0.5 = max-pool 2x2/2; each then Conv1x1 (-> out, no bias) + LN and Conv3x3 pad 1 (no bias) +
  LN; LN over channels, eps 1e-6; p6 as above; no lateral or top-down path. Names `simfp_{stage}.{i}`
  with detectron2's nn.Sequential indices (parameterless layers keep their slot). Convs keep PyTorch's
  default init (detectron2 applies none here): U(+-1/sqrt(fan_in)), ConvT fan_in = out * k * k as torch
  computes it from the [in, out, k, k] weight.
- `SimpleFeaturePyramid(variant="bob")`: BoB's `ViTdet` pyramid followed by its `FPN_VITDET` neck
  (`hsouri/bob-detection`, `mmdet/models/{backbones/vitdet.py, necks/fpn_vitdet.py}`, config
  `configs/bob/ViTDet/cascade_mask_rcnn_vitdet-b_fpn_3x_coco_base.py`). Pyramid without channel
  reduction: `fpn1` = ConvT(D, D) -> LN(eps 1e-6) -> GELU -> ConvT(D, D), `fpn2` = ConvT(D, D), `fpn3`
  identity, `fpn4` max-pool 2x2/2 (torch default init, no norm after them). Neck with
  `use_residual=False` (no top-down sum), `norm_cfg=LN`, `act_cfg=None`, `num_outs=5`: per level
  `lateral_convs.i` = 1x1 conv (no bias: mmcv bias='auto' with a norm) + LN, `fpn_convs.i` = 3x3 conv
  pad 1 (no bias) + LN, then p6 = max-pool(1, stride 2) of p5. Its LN is mmcv's `build_norm_layer('LN')`
  = `nn.LayerNorm(C)` with torch's default eps 1e-5 (not 1e-6), applied channels-last (ConvModule_Norm
  permutes). Conv init: FPN_VITDET's `init_cfg=Xavier(uniform)` (U(+-sqrt(6 / (fan_in + fan_out)))),
  applied after ConvModule's own kaiming init. Uncertain: that mmcv's init order leaves Xavier in
  place for these ConvModules (mmcv 1.x `BaseModule.init_weights` runs `init_cfg` on the whole module;
  ConvModule inits itself in its constructor, so Xavier should win); the final backbone LayerNorm
  that BoB keeps lives in `ViTDetBackbone(variant="bob")`, not here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from bob_jax.detection.layers import ConvTranspose2x2, uniform
from bob_jax.models.vit import LayerNorm

INITS = ("c2_xavier", "torch_default", "xavier_uniform")
VARIANTS = ("vitdet", "bob")
DETECTRON2_LN_EPS = 1e-6  # detectron2.layers.LayerNorm (get_norm("LN"))
MMCV_LN_EPS = 1e-5  # torch nn.LayerNorm default, what mmcv's build_norm_layer("LN") builds


def _conv_weight(key, shape, init: str, fan_in: int, fan_out: int):
    if init == "c2_xavier":  # kaiming_uniform_(a=1): gain sqrt(2 / (1 + 1)), bound gain * sqrt(3 / fan_in)
        return uniform(key, shape, math.sqrt(3.0 / fan_in))
    if init == "torch_default":  # kaiming_uniform_(a=sqrt(5))
        return uniform(key, shape, 1.0 / math.sqrt(fan_in))
    if init == "xavier_uniform":
        return uniform(key, shape, math.sqrt(6.0 / (fan_in + fan_out)))
    raise ValueError(f"init={init!r} is not supported; use one of {INITS}")


def _bias(key, n: int, init: str, fan_in: int):
    # PyTorch's default conv bias is U(+-1/sqrt(fan_in)); detectron2 c2_xavier and mmcv Xavier zero it.
    if init == "torch_default":
        return uniform(key, (n,), 1.0 / math.sqrt(fan_in))
    return jnp.zeros((n,), jnp.float32)


class Conv2d(nnx.Module):
    """detectron2 `layers.Conv2d`: a stride-1 k x k conv with symmetric padding, then an optional
    channel LayerNorm (`norm`). Kernel HWIO [k, k, in, out]."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, padding: int = 0, bias: bool = True,
                 norm_eps: float | None = None, init: str = "c2_xavier", rngs: nnx.Rngs):
        fan_in, fan_out = in_ch * kernel_size ** 2, out_ch * kernel_size ** 2
        shape = (kernel_size, kernel_size, in_ch, out_ch)
        self.kernel = nnx.Param(_conv_weight(rngs.params(), shape, init, fan_in, fan_out))
        self.bias = nnx.Param(_bias(rngs.params(), out_ch, init, fan_in)) if bias else None
        self.norm = LayerNorm(out_ch, norm_eps) if norm_eps is not None else None
        self.padding = padding
        self.dtype = None  # compute dtype (backbones.set_compute_dtype); None: the parameters'

    def __call__(self, x):
        dtype = self.dtype or self.kernel[...].dtype
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(dtype), self.kernel[...].astype(dtype), (1, 1), ((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return self.norm(y) if self.norm is not None else y


class GELU(nnx.Module):
    """Exact (erf) GELU, as `nn.GELU()`; a module so that Sequential indices match detectron2's."""

    def __call__(self, x):
        return jax.nn.gelu(x, approximate=False)


class MaxPool2x2(nnx.Module):
    """`nn.MaxPool2d(kernel_size=2, stride=2)`: floor mode, an odd last row/column is dropped."""

    def __call__(self, x):
        return max_pool(x, 2)


def max_pool(x, kernel: int):
    """Max-pool with kernel = stride, no padding (floor): kernel 1 is detectron2's LastLevelMaxPool."""
    if kernel == 1:
        return x[:, ::2, ::2]
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, kernel, kernel, 1), (1, kernel, kernel, 1),
                                 "VALID")


def last_level_max_pool(p5):
    """detectron2 `LastLevelMaxPool` / mmdet extra level: `F.max_pool2d(p5, 1, stride=2)`."""
    return max_pool(p5, 1)


def _stage(stride: float) -> int:
    stage = math.log2(stride)
    if stride < 1 or stage != int(stage):
        raise ValueError(
            f"feature stride {stride} is not a power of two; anchors and RoI levels need strides 4..64. "
            "For patch-14 ViTs resize the patch embedding to 16 (ViTDetBackbone.from_vit(patch_size=16))"
        )
    return int(stage)


def _check_contiguous(strides):
    for s0, s1 in itertools.pairwise(strides):
        if s1 != 2 * s0:
            raise ValueError(f"strides {list(strides)} are not log2-contiguous (each twice the previous)")


def _apply(layers, x):
    for layer in layers:
        x = layer(x)
    return x


class FPN(nnx.Module):
    """Feature pyramid network over {stride: channels}, e.g. ResNet-50's {4: 256, 8: 512, 16: 1024,
    32: 2048}; call it with the backbone's `features` dict (extra strides such as 2 are ignored)."""

    def __init__(self, in_channels: Mapping[int, int], out_channels: int = 256, norm: str | None = None, *,
                 rngs: nnx.Rngs):
        if norm not in (None, "LN"):
            raise ValueError(f"norm={norm!r} is not supported; use None or 'LN'")
        self.strides = tuple(sorted(int(s) for s in in_channels))
        _check_contiguous(self.strides)
        self.stages = tuple(_stage(s) for s in self.strides)
        eps = DETECTRON2_LN_EPS if norm == "LN" else None
        for stride, stage in zip(self.strides, self.stages):
            setattr(self, f"fpn_lateral{stage}", Conv2d(in_channels[stride], out_channels, 1, bias=norm is None,
                                                        norm_eps=eps, rngs=rngs))
            setattr(self, f"fpn_output{stage}", Conv2d(out_channels, out_channels, 3, padding=1,
                                                       bias=norm is None, norm_eps=eps, rngs=rngs))
        self.out_channels = out_channels

    def __call__(self, features: Mapping[int, jax.Array]) -> dict[str, jax.Array]:
        missing = [s for s in self.strides if s not in features]
        if missing:
            raise ValueError(f"FPN needs feature strides {list(self.strides)}; missing {missing} "
                             f"(got {sorted(features)})")
        results = {}
        prev = None
        for stride, stage in reversed(list(zip(self.strides, self.stages))):
            lateral = getattr(self, f"fpn_lateral{stage}")(features[stride])
            if prev is not None:
                up = jnp.repeat(jnp.repeat(prev, 2, axis=1), 2, axis=2)  # F.interpolate(x2, 'nearest')
                if up.shape[1:3] != lateral.shape[1:3]:
                    raise ValueError(
                        f"stride-{stride} map {lateral.shape[1:3]} is not twice the next level's "
                        f"{prev.shape[1:3]}: pad images to a multiple of {self.strides[-1]}")
                lateral = lateral + up
            prev = lateral
            results[f"p{stage}"] = getattr(self, f"fpn_output{stage}")(lateral)
        top = self.stages[-1]
        results[f"p{top + 1}"] = last_level_max_pool(results[f"p{top}"])
        return dict(sorted(results.items(), key=lambda kv: int(kv[0][1:])))


class ConvModule(nnx.Module):
    """mmcv `ConvModule` as BoB's `ConvModule_Norm` uses it: `conv` (no bias: a norm follows) + `ln`."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, padding: int = 0, rngs: nnx.Rngs):
        self.conv = Conv2d(in_ch, out_ch, kernel_size, padding=padding, bias=False, init="xavier_uniform",
                           rngs=rngs)
        self.ln = LayerNorm(out_ch, MMCV_LN_EPS)

    def __call__(self, x):
        return self.ln(self.conv(x))


class SimpleFeaturePyramid(nnx.Module):
    """ViTDet simple feature pyramid over a plain ViT's single map: call with {in_stride: [B, h, w, D]}
    (`ViTDetBackbone(...)(x)["features"]`) -> {"p2".."p6"}; see the module docstring for the variants."""

    def __init__(self, in_dim: int, out_channels: int = 256, scale_factors=(4.0, 2.0, 1.0, 0.5),
                 variant: str = "vitdet", *, in_stride: int = 16, rngs: nnx.Rngs):
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is not supported; use one of {VARIANTS}")
        scale_factors = tuple(float(s) for s in scale_factors)
        strides = [in_stride / s for s in scale_factors]
        self.stages = tuple(_stage(s) for s in strides)
        _check_contiguous(strides)
        self.in_stride, self.variant, self.scale_factors = in_stride, variant, scale_factors
        if variant == "bob":
            if scale_factors != (4.0, 2.0, 1.0, 0.5):
                raise ValueError(f"BoB's pyramid has scales (4, 2, 1, 0.5), got {scale_factors}")
            self._build_bob(in_dim, out_channels, rngs)
        else:
            for scale, stage in zip(scale_factors, self.stages):
                setattr(self, f"simfp_{stage}", self._vitdet_stage(in_dim, out_channels, scale, rngs))

    @staticmethod
    def _vitdet_stage(dim: int, out_channels: int, scale: float, rngs: nnx.Rngs) -> nnx.List:
        if scale == 4.0:
            layers = [ConvTranspose2x2(dim, dim // 2, rngs=rngs), LayerNorm(dim // 2, DETECTRON2_LN_EPS), GELU(),
                      ConvTranspose2x2(dim // 2, dim // 4, rngs=rngs)]
            out_dim = dim // 4
        elif scale == 2.0:
            layers, out_dim = [ConvTranspose2x2(dim, dim // 2, rngs=rngs)], dim // 2
        elif scale == 1.0:
            layers, out_dim = [], dim
        elif scale == 0.5:
            layers, out_dim = [MaxPool2x2()], dim
        else:
            raise ValueError(f"scale factor {scale} is not supported; use 4, 2, 1 or 0.5 (as detectron2)")
        layers += [
            Conv2d(out_dim, out_channels, 1, bias=False, norm_eps=DETECTRON2_LN_EPS, init="torch_default",
                   rngs=rngs),
            Conv2d(out_channels, out_channels, 3, padding=1, bias=False, norm_eps=DETECTRON2_LN_EPS,
                   init="torch_default", rngs=rngs),
        ]
        return nnx.List(layers)

    def _build_bob(self, dim: int, out_channels: int, rngs: nnx.Rngs):
        self.fpn1 = nnx.List([ConvTranspose2x2(dim, dim, rngs=rngs), LayerNorm(dim, 1e-6), GELU(),
                              ConvTranspose2x2(dim, dim, rngs=rngs)])
        self.fpn2 = nnx.List([ConvTranspose2x2(dim, dim, rngs=rngs)])
        self.lateral_convs = nnx.List([ConvModule(dim, out_channels, 1, rngs=rngs) for _ in range(4)])
        self.fpn_convs = nnx.List([ConvModule(out_channels, out_channels, 3, padding=1, rngs=rngs)
                                   for _ in range(4)])

    def _input(self, features) -> jax.Array:
        if self.in_stride not in features:
            raise ValueError(f"SimpleFeaturePyramid was built for the stride-{self.in_stride} map; got strides "
                             f"{sorted(features)}")
        return features[self.in_stride]

    def __call__(self, features: Mapping[int, jax.Array]) -> dict[str, jax.Array]:
        x = self._input(features)
        if self.variant == "bob":
            maps = [_apply(self.fpn1, x), _apply(self.fpn2, x), x, max_pool(x, 2)]
            outs = [fpn(lat(m)) for m, lat, fpn in zip(maps, self.lateral_convs, self.fpn_convs)]
        else:
            outs = [_apply(getattr(self, f"simfp_{stage}"), x) for stage in self.stages]
        results = {f"p{stage}": out for stage, out in zip(self.stages, outs)}
        top = self.stages[-1]
        results[f"p{top + 1}"] = last_level_max_pool(results[f"p{top}"])
        return results
