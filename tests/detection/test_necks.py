"""Necks: FPN and both simple-feature-pyramid variants against plain-torch re-implementations of
detectron2's `FPN` / `SimpleFeaturePyramid` and BoB's `ViTdet` pyramid + `FPN_VITDET` (ConvT layout, LN
eps and placement, nearest top-down, max-pool p6), initialisation bounds, p2..p6 shapes on every
hierarchical family and on a ViT-S trunk (traced, not compiled), and the errors."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from bob_jax import backbones
from bob_jax.convert import abstract_leaves
from bob_jax.detection.necks import FPN, SimpleFeaturePyramid
from bob_jax.detection.vitdet import ViTDetBackbone
from bob_jax.testing.abstract import abstract_backbone
from bob_jax.testing.reference import redraw_leaves

pytestmark = pytest.mark.usefixtures("fast_compile")


def _randomize(model, seed):
    """Every parameter re-drawn at a natural scale (norm scales around 1, biases non-zero)."""
    return redraw_leaves(model, seed)


@nnx.jit
def _apply(module, features):
    return module(features)


def _maps(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {s: rng.normal(size=shape).astype(np.float32) for s, shape in shapes.items()}


# ----------------------------------------------------------------------------------------------
# torch re-implementations (NCHW, functional, parameters taken from our leaves)
# ----------------------------------------------------------------------------------------------


def _t(torch, params):
    return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in params.items()}


def _nchw(torch, x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _ln_channels_first(x, w, b, eps):
    """detectron2 `layers.LayerNorm` (channels-first), written out as it does."""
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    return w[:, None, None] * ((x - u) / (s + eps).sqrt()) + b[:, None, None]


def _ln_channels_last(torch, x, w, b, eps):
    """mmcv LN / BoB's Norm2d: permute to NHWC, nn.LayerNorm, permute back."""
    return torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, eps).permute(0, 3, 1, 2)


def _conv(torch, p, name, x, padding=0, norm_eps=None):
    y = torch.nn.functional.conv2d(x, p[f"{name}.kernel"].permute(3, 2, 0, 1), p.get(f"{name}.bias"),
                                   padding=padding)
    if norm_eps is not None:
        y = _ln_channels_first(y, p[f"{name}.norm.scale"], p[f"{name}.norm.bias"], norm_eps)
    return y


def _conv_t(torch, p, name, x):
    # torch ConvTranspose2d weight [in, out, kh, kw] from our [kh, kw, in, out].
    return torch.nn.functional.conv_transpose2d(x, p[f"{name}.kernel"].permute(2, 3, 0, 1), p[f"{name}.bias"],
                                                stride=2)


def _torch_fpn(torch, params, strides, feats, norm_eps):
    """detectron2 FPN.forward with top_block=LastLevelMaxPool."""
    p = _t(torch, params)
    stages = [int(math.log2(s)) for s in strides]
    xs = [_nchw(torch, feats[s]) for s in strides][::-1]
    st = stages[::-1]
    prev = _conv(torch, p, f"fpn_lateral{st[0]}", xs[0], norm_eps=norm_eps)
    results = [_conv(torch, p, f"fpn_output{st[0]}", prev, 1, norm_eps)]
    for x, stage in zip(xs[1:], st[1:]):
        top_down = torch.nn.functional.interpolate(prev, scale_factor=2, mode="nearest")
        prev = _conv(torch, p, f"fpn_lateral{stage}", x, norm_eps=norm_eps) + top_down
        results.insert(0, _conv(torch, p, f"fpn_output{stage}", prev, 1, norm_eps))
    results.append(torch.nn.functional.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
    return {f"p{s}": r.numpy().transpose(0, 2, 3, 1) for s, r in zip(stages + [stages[-1] + 1], results)}


def _torch_sfp_vitdet(torch, params, x):
    """detectron2 SimpleFeaturePyramid (scales 4, 2, 1, 0.5, norm 'LN') + LastLevelMaxPool."""
    F = torch.nn.functional
    p = _t(torch, params)
    x = _nchw(torch, x)
    eps = 1e-6
    y2 = _conv_t(torch, p, "simfp_2.3", F.gelu(_ln_channels_first(
        _conv_t(torch, p, "simfp_2.0", x), p["simfp_2.1.scale"], p["simfp_2.1.bias"], eps)))
    heads = {2: (y2, 4), 3: (_conv_t(torch, p, "simfp_3.0", x), 1), 4: (x, 0),
             5: (F.max_pool2d(x, kernel_size=2, stride=2), 1)}
    out = {}
    for stage, (y, first) in heads.items():
        y = _conv(torch, p, f"simfp_{stage}.{first}", y, norm_eps=eps)
        out[f"p{stage}"] = _conv(torch, p, f"simfp_{stage}.{first + 1}", y, 1, eps)
    out["p6"] = F.max_pool2d(out["p5"], 1, stride=2)
    return {k: v.numpy().transpose(0, 2, 3, 1) for k, v in out.items()}


def _torch_sfp_bob(torch, params, x):
    """BoB ViTdet fpn1..fpn4 + FPN_VITDET(use_residual=False, norm LN, num_outs=5)."""
    F = torch.nn.functional
    p = _t(torch, params)
    x = _nchw(torch, x)
    fpn1 = _conv_t(torch, p, "fpn1.3", F.gelu(_ln_channels_last(
        torch, _conv_t(torch, p, "fpn1.0", x), p["fpn1.1.scale"], p["fpn1.1.bias"], 1e-6)))
    inputs = [fpn1, _conv_t(torch, p, "fpn2.0", x), x, F.max_pool2d(x, kernel_size=2, stride=2)]
    outs = []
    for i, y in enumerate(inputs):
        lat = _ln_channels_last(torch, _conv(torch, p, f"lateral_convs.{i}.conv", y),
                                p[f"lateral_convs.{i}.ln.scale"], p[f"lateral_convs.{i}.ln.bias"], 1e-5)
        outs.append(_ln_channels_last(torch, _conv(torch, p, f"fpn_convs.{i}.conv", lat, 1),
                                      p[f"fpn_convs.{i}.ln.scale"], p[f"fpn_convs.{i}.ln.bias"], 1e-5))
    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
    return {f"p{i + 2}": o.numpy().transpose(0, 2, 3, 1) for i, o in enumerate(outs)}


def _assert_maps_close(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert np.std(want[k]) > 0.05, k
        np.testing.assert_allclose(np.asarray(got[k]), want[k], atol=1e-4, rtol=1e-4, err_msg=k)


@pytest.mark.reference
@pytest.mark.parametrize("norm", [None, "LN"])
def test_fpn_matches_torch_detectron2(reference, norm):
    torch, _ = reference
    channels = {4: 12, 8: 20, 16: 24, 32: 40}
    fpn = _randomize(FPN(channels, 16, norm=norm, rngs=nnx.Rngs(0)), 1)
    feats = _maps({2: (2, 32, 32, 8), **{s: (2, 64 // s, 64 // s, c) for s, c in channels.items()}})
    want = _torch_fpn(torch, abstract_leaves(fpn), sorted(channels), feats, 1e-6 if norm else None)
    _assert_maps_close(_apply(fpn, feats), want)


@pytest.mark.reference
@pytest.mark.parametrize("variant", ["vitdet", "bob"])
def test_simple_feature_pyramid_matches_torch(reference, variant):
    torch, _ = reference
    sfp = _randomize(SimpleFeaturePyramid(16, 12, variant=variant, rngs=nnx.Rngs(0)), 2)
    x = _maps({16: (2, 5, 5, 16)})  # odd: the 2x2 max-pool floors to 2x2, p6 takes rows/cols 0
    reference_fn = _torch_sfp_vitdet if variant == "vitdet" else _torch_sfp_bob
    got = _apply(sfp, x)
    _assert_maps_close(got, reference_fn(torch, abstract_leaves(sfp), x[16]))
    assert {k: v.shape[1] for k, v in got.items()} == {"p2": 20, "p3": 10, "p4": 5, "p5": 2, "p6": 1}


# ----------------------------------------------------------------------------------------------
# initialisation
# ----------------------------------------------------------------------------------------------


def _check_uniform(w, bound):
    w = np.asarray(w).ravel()
    assert np.abs(w).max() <= bound * (1 + 1e-6)
    assert np.abs(w).max() > 0.95 * bound
    assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.05
    assert abs(w.mean()) < 0.05 * bound


def test_initialisation_follows_the_sources():
    fpn = FPN({4: 64, 8: 128}, 64, rngs=nnx.Rngs(0))
    _check_uniform(fpn.fpn_lateral2.kernel[...], math.sqrt(3 / 64))  # c2_xavier_fill: fan_in = 64 * 1 * 1
    _check_uniform(fpn.fpn_output3.kernel[...], math.sqrt(3 / (64 * 9)))
    assert not np.any(fpn.fpn_output3.bias[...])
    assert not np.allclose(fpn.fpn_output2.kernel[...], fpn.fpn_output3.kernel[...])  # independent draws

    sfp = SimpleFeaturePyramid(128, 64, rngs=nnx.Rngs(0))
    _check_uniform(sfp.simfp_2[0].kernel[...], 1 / math.sqrt(64 * 4))  # ConvT: torch fan_in = out * k * k
    _check_uniform(sfp.simfp_4[1].kernel[...], 1 / math.sqrt(64 * 9))  # nn.Conv2d default
    np.testing.assert_array_equal(sfp.simfp_4[1].norm.scale[...], 1.0)
    assert sfp.simfp_4[1].bias is None

    bob = SimpleFeaturePyramid(128, 64, variant="bob", rngs=nnx.Rngs(0))
    _check_uniform(bob.lateral_convs[0].conv.kernel[...], math.sqrt(6 / (128 + 64)))  # xavier uniform
    _check_uniform(bob.fpn_convs[3].conv.kernel[...], math.sqrt(6 / (64 * 9 + 64 * 9)))
    assert bob.lateral_convs[0].ln.eps == 1e-5 and bob.fpn1[1].eps == 1e-6

    same = FPN({4: 64, 8: 128}, 64, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(same.fpn_output3.kernel[...], fpn.fpn_output3.kernel[...])


# ----------------------------------------------------------------------------------------------
# shapes per family (traced with abstract parameters: nothing computed)
# ----------------------------------------------------------------------------------------------


_SMALL_SWIN = {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2), "img_size": 128, "window_size": 4}


def _abstract_backbone(name, **kw):
    return abstract_backbone(name, num_classes=0, **kw)


def _pyramid_shapes(backbone, neck, size):
    (bg, bs), (ng, ns) = nnx.split(backbone), nnx.split(neck)
    x = jax.ShapeDtypeStruct((2, size, size, 3), np.float32)
    out = jax.eval_shape(lambda bs, ns, x: nnx.merge(ng, ns)(nnx.merge(bg, bs)(x)["features"]), bs, ns, x)
    return {k: tuple(v.shape) for k, v in out.items()}


def _expected(size, channels=256):
    return {f"p{k}": (2, size // 2 ** k, size // 2 ** k, channels) for k in range(2, 7)}


@pytest.mark.parametrize("name,kw,channels", [
    ("tf_efficientnet_lite0.in1k", {}, {4: 24, 8: 40, 16: 112, 32: 320}),
    ("resnet50.tv_in1k", {}, {4: 256, 8: 512, 16: 1024, 32: 2048}),
    ("convnext_tiny.fb_in1k", {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)}, {4: 16, 8: 32, 16: 64, 32: 128}),
    ("swin_tiny_patch4_window7_224.ms_in1k",
     _SMALL_SWIN,
     {4: 16, 8: 32, 16: 64, 32: 128}),
    ("swinv2_tiny_window8_256.ms_in1k",
     _SMALL_SWIN,
     {4: 16, 8: 32, 16: 64, 32: 128}),
])
def test_fpn_shapes_on_hierarchical_families(name, kw, channels):
    backbone = _abstract_backbone(name, **kw)
    assert {s: c for s, c in backbone.feature_info.items() if s >= 4} == channels
    neck = nnx.eval_shape(lambda: FPN(channels, rngs=nnx.Rngs(0)))
    assert _pyramid_shapes(backbone, neck, 128) == _expected(128)


@pytest.mark.parametrize("variant", ["vitdet", "bob"])
def test_simple_pyramid_shapes_on_vit_small(variant):
    vit = backbones.create("vit_small_patch16_224.augreg_in1k", num_classes=0, depth=3)
    trunk = ViTDetBackbone.from_vit(vit, img_size=128, variant=variant, global_blocks=(2,))
    neck = nnx.eval_shape(lambda: SimpleFeaturePyramid(384, variant=variant, rngs=nnx.Rngs(0)))
    assert _pyramid_shapes(trunk, neck, 128) == _expected(128)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="log2-contiguous"):
        FPN({4: 8, 16: 8}, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not supported"):
        FPN({4: 8}, 8, norm="BN", rngs=nnx.Rngs(0))
    fpn = FPN({4: 8, 8: 8}, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"missing \[8\]"):
        fpn(_maps({4: (1, 8, 8, 8)}))
    with pytest.raises(ValueError, match="pad images to a multiple of 8"):
        fpn(_maps({4: (1, 9, 9, 8), 8: (1, 4, 4, 8)}))
    with pytest.raises(ValueError, match="scale factor 8.0"):
        SimpleFeaturePyramid(8, 8, scale_factors=(8.0,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not a power of two"):
        SimpleFeaturePyramid(8, 8, scale_factors=(3.0,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="BoB's pyramid"):
        SimpleFeaturePyramid(8, 8, scale_factors=(2, 1, 0.5), variant="bob", rngs=nnx.Rngs(0))
    sfp = SimpleFeaturePyramid(8, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="stride-16 map"):
        sfp(_maps({14: (1, 4, 4, 8)}))
