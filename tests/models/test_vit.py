"""Vision Transformers vs timm `VisionTransformer`: every zoo name accounted, every variant flag a listed
checkpoint uses at reduced size (logits, pooled, last-block feature map, per-block intermediates), the
full-size ViT-S/16 at 64 px, pos-embed resampling and a mutation test. float32, 1e-4."""

import numpy as np
import pytest

from bob_jax import backbones
from bob_jax.backbones.zoo import ZOO
from bob_jax.convert import ConversionError
from bob_jax.convert import vit as convert_vit
from bob_jax.models import vit as vit_lib
from bob_jax.models.pos_embed import resample_abs_pos_embed
from bob_jax.testing import assert_parity, parity_error
from bob_jax.testing.reference import (
    account_against_timm,
    check_output_scale,
    redraw_parameters,
    require_reference,
    state_dict_numpy,
)

pytestmark = pytest.mark.reference

_SMALL = dict(depth=2, embed_dim=64, num_heads=4)
# name -> (arch, timm kwargs at reduced size); each a flag some listed checkpoint uses.
VARIANTS = {
    "cls_token": ("vit_small_patch16_224", {}),  # AugReg, DeiT, DINO, MAE
    "avg_fc_norm": ("vit_small_patch16_224", dict(global_pool="avg")),  # fc_norm after pooling
    "avg_no_fc_norm": ("vit_base_patch16_224", dict(global_pool="avg", fc_norm=False)),
    "clip_gelu": ("vit_base_patch16_clip_224", {}),  # norm_pre, LN 1e-5, no patch bias
    "clip_quickgelu": ("vit_base_patch16_clip_quickgelu_224", {}),
    "dinov2_layer_scale": ("vit_small_patch14_dinov2", {}),
    "dinov2_reg4": ("vit_base_patch14_reg4_dinov2", {}),  # registers, no_embed_class
    # ViT-g's real mlp_ratio 2.66667 * 2 at embed_dim 48 gives an even SwiGLU width (256).
    "dinov2_giant_swiglu": ("vit_giant_patch14_reg4_dinov2", dict(embed_dim=48)),
    "mocov3_s_12_heads": ("vit_small_patch16_224", dict(embed_dim=96, num_heads=12)),
}


def _torch_outputs(model, x):
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        logits = model(xt).numpy()
        pooled = model.forward_head(model.forward_features(xt), pre_logits=True).numpy()
        last = model.forward_intermediates(xt, indices=1, intermediates_only=True)[0].numpy()
        blocks = model.forward_intermediates(xt, return_prefix_tokens=True, intermediates_only=True)
    blocks = [(p.numpy().transpose(0, 2, 3, 1), None if pre is None else pre.numpy()) for p, pre in blocks]
    return logits, pooled, last.transpose(0, 2, 3, 1), blocks


def _timm(arch, seed, **kw):
    _, timm = require_reference()
    return redraw_parameters(timm.create_model(arch, pretrained=False, **kw).eval(), seed)


def _check(model_t, model_f, x, *, intermediates=True):
    logits, pooled, last, blocks = _torch_outputs(model_t, x)
    check_output_scale(pooled)
    out = backbones.forward(model_f, x, intermediates=intermediates)
    if model_t.num_classes:
        check_output_scale(logits)
        assert_parity(out["logits"], logits, what="logits")
    else:
        assert "logits" not in out
    assert_parity(out["pooled"], pooled, what="pooled")
    stride = model_t.patch_embed.patch_size[0]
    assert set(out["features"]) == {stride} and model_f.feature_info == {stride: model_t.embed_dim}
    assert_parity(out["features"][stride], last, what="features")
    if intermediates:
        ncls, nreg = int(model_t.has_class_token), model_t.num_reg_tokens
        for i, (patch, prefix) in enumerate(blocks):
            got = out["intermediates"][f"blocks.{i}"]
            assert_parity(got["patch"], patch, what=f"blocks.{i} patch")
            if ncls:
                assert_parity(got["cls"], prefix[:, 0], what=f"blocks.{i} cls")
            if nreg:
                assert_parity(got["reg"], prefix[:, ncls:], what=f"blocks.{i} reg")
            assert set(got) == {"patch"} | ({"cls"} if ncls else set()) | ({"reg"} if nreg else set())
    return out


def test_accounting_every_zoo_name():
    """Key and shape accounting of every zoo name (with its tag's head size) against timm, on meta."""
    require_reference()
    names = sorted(n for n, e in ZOO.items() if e.arch in vit_lib.ARCHS)
    assert len(names) == 26
    # Each distinct (arch, kwargs) once: the tags of one arch share the network.
    variants = {(ZOO[n].arch, tuple(sorted(ZOO[n].default_kwargs().items()))) for n in names}
    for arch, kwargs in sorted(variants):
        account_against_timm(arch, **dict(kwargs))
    for arch in vit_lib.ARCHS:
        if not any(ZOO[n].arch == arch for n in names):
            account_against_timm(arch)
    assert ZOO["vit_small_patch16_224.mocov3"].default_kwargs()["num_heads"] == 12
    # DINOv2 weights are used below native resolution; the pos-embed shape follows img_size.
    account_against_timm("vit_large_patch14_reg4_dinov2", img_size=224)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reduced_variant_matches_timm(variant):
    arch, extra = VARIANTS[variant]
    p = 14 if "patch14" in arch else 16
    for i, size in enumerate((2 * p, 3 * p)):
        kw = {**_SMALL, **extra, "img_size": size}
        ref = _timm(arch, i, **kw)
        model = backbones.from_timm_state_dict(arch, state_dict_numpy(ref), **kw)
        x = np.random.default_rng(i).standard_normal((2, size, size, 3)).astype(np.float32)
        _check(ref, model, x, intermediates=i == 0)


def test_dynamic_img_size_resamples_in_graph():
    """timm dynamic_img_size resamples pos_embed (bicubic, antialias) per input; so does the JAX graph."""
    kw = {**_SMALL, "img_size": 56, "dynamic_img_size": True}
    for arch in ("vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"):
        ref = _timm(arch, 3, **kw)
        model = backbones.from_timm_state_dict(arch, state_dict_numpy(ref), **kw)
        for size in (42, 70):  # downsample 4x4 -> 3x3, upsample -> 5x5
            x = np.random.default_rng(size).standard_normal((1, size, size, 3)).astype(np.float32)
            _check(ref, model, x, intermediates=False)


def test_fixed_img_size_rejects_other_inputs():
    require_reference()
    ref = _timm("vit_small_patch16_224", 0, **_SMALL, img_size=32)
    sd = state_dict_numpy(ref)
    model = backbones.from_timm_state_dict("vit_small_patch16_224", sd, **_SMALL, img_size=32)
    with pytest.raises(ValueError, match="img_size"):
        backbones.forward(model, np.zeros((1, 48, 48, 3), np.float32))
    # A size that is not a multiple of the patch: timm's conv drops the remainder, and so does ours.
    ref = _timm("vit_small_patch14_dinov2", 1, **_SMALL, img_size=33)
    model = backbones.from_timm_state_dict("vit_small_patch14_dinov2", state_dict_numpy(ref), **_SMALL,
                                           img_size=33)
    x = np.random.default_rng(1).standard_normal((1, 33, 33, 3)).astype(np.float32)
    _check(ref, model, x, intermediates=False)


def test_full_size_vit_small_matches_timm():
    ref = _timm("vit_small_patch16_224", 0, img_size=64)
    model = backbones.from_timm_state_dict("vit_small_patch16_224", state_dict_numpy(ref), img_size=64)
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    _check(ref, model, x, intermediates=False)


@pytest.mark.parametrize(
    "old, new, prefix, antialias",
    [(37, (16, 16), 1, True), (37, (16, 16), 0, True), (37, (40, 40), 1, True), (37, (12, 20), 1, True),
     (37, (16, 16), 1, False), (14, (37, 37), 0, False)],
)
def test_resample_abs_pos_embed_matches_timm(old, new, prefix, antialias):
    torch, _ = require_reference()
    from timm.layers import resample_abs_pos_embed as timm_resample

    pos = np.random.default_rng(old).standard_normal((1, prefix + old * old, 24)).astype(np.float32)
    want = timm_resample(torch.from_numpy(pos), list(new), num_prefix_tokens=prefix, antialias=antialias)
    want = want.numpy()
    got = resample_abs_pos_embed(pos, new, num_prefix_tokens=prefix, antialias=antialias)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) < 2e-5


@pytest.mark.parametrize("arch", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_checkpoint_pos_embed_resampled_like_timm(arch):
    """A 5x5-grid checkpoint loaded into a 3x3-grid model: timm's checkpoint_filter_fn vs ours."""
    torch, timm = require_reference()
    from timm.models.vision_transformer import checkpoint_filter_fn

    src = _timm(arch, 5, **_SMALL, img_size=70)
    sd = state_dict_numpy(src)
    ref = timm.create_model(arch, pretrained=False, **_SMALL, img_size=42).eval()
    ref.load_state_dict(checkpoint_filter_fn({k: torch.from_numpy(v) for k, v in sd.items()}, ref))
    cfg = vit_lib.ARCHS[arch](**_SMALL, img_size=42)
    resampled = convert_vit.resample_pos_embed(sd, cfg)
    model = backbones.from_timm_state_dict(arch, resampled, **_SMALL, img_size=42)
    x = np.random.default_rng(1).standard_normal((2, 42, 42, 3)).astype(np.float32)
    _check(ref, model, x, intermediates=False)
    # The family's checkpoint filter (Family.adapt) does the same inside from_timm_state_dict/create.
    hooked = backbones.from_timm_state_dict(arch, sd, **_SMALL, img_size=42)
    _check(ref, hooked, x, intermediates=False)
    # Equivalent without resampling the checkpoint: keep its grid, resample in the graph per input.
    dynamic = backbones.from_timm_state_dict(arch, sd, **_SMALL, img_size=70, dynamic_img_size=True)
    _check(ref, dynamic, x, intermediates=False)


def test_mocov3_layout_and_head_count(tmp_path):
    """Official MoCo v3 keys (module.base_encoder.*, projector head, momentum encoder) convert; only the
    12-head model matches a 12-head timm ViT (the weights cannot tell 6 from 12 heads)."""
    torch, _ = require_reference()
    kw = dict(depth=2, embed_dim=96, num_classes=0, img_size=32)
    ref = _timm("vit_small_patch16_224", 7, num_heads=12, **kw)
    sd = state_dict_numpy(ref)
    moco = {f"module.base_encoder.{k}": v for k, v in sd.items()}
    moco |= {f"module.momentum_encoder.{k}": v for k, v in sd.items()}
    moco |= {"module.base_encoder.head.0.weight": np.zeros((16, 96), np.float32),
             "module.base_encoder.head.1.running_mean": np.zeros(16, np.float32),
             "module.predictor.0.weight": np.zeros((16, 16), np.float32)}
    model = backbones.from_timm_state_dict("vit_small_patch16_224", moco, num_heads=12, **kw)
    x = np.random.default_rng(7).standard_normal((2, 32, 32, 3)).astype(np.float32)
    _check(ref, model, x, intermediates=False)
    wrong = backbones.from_timm_state_dict("vit_small_patch16_224", moco, num_heads=6, **kw)
    _, pooled, _, _ = _torch_outputs(ref, x)
    assert parity_error(backbones.forward(wrong, x)["pooled"], pooled) > 1e-3
    # The zoo entry fixes the head count: a release-style file loads with 12 heads by default.
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in moco.items()}}, tmp_path / "moco.pth.tar")
    entry = backbones.create("vit_small_patch16_224.mocov3", weights=tmp_path / "moco.pth.tar",
                             weights_key="state_dict", depth=2, embed_dim=96, img_size=32)
    assert_parity(backbones.forward(entry, x)["pooled"], pooled, what="mocov3 entry")


def _official_dinov2(sd, rng):
    """timm DINOv2 keys -> the official facebookresearch/dinov2 layout (inverse of `_convert_dinov2`)."""
    swiglu = sd["blocks.0.mlp.fc1.weight"].shape[0] == 2 * sd["blocks.0.mlp.fc2.weight"].shape[1]
    out = {}
    for k, v in sd.items():  # the official SwiGLU (ViT-g) names its packed layers w12 / w3
        out[k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.") if swiglu else k] = v
    out["mask_token"] = np.zeros((1, sd["cls_token"].shape[-1]), np.float32)
    if "reg_token" in sd:
        pos0 = rng.standard_normal(sd["cls_token"].shape).astype(np.float32)
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = sd["cls_token"] - pos0
        out["pos_embed"] = np.concatenate([pos0, sd["pos_embed"]], axis=1)
    return out


def _official_openai_clip(sd):
    """timm CLIP keys -> OpenAI CLIP's `visual.*` layout (inverse of `_convert_openai_clip`) + text keys."""
    swaps = [("patch_embed.proj", "conv1"), ("pos_embed", "positional_embedding"),
             ("blocks.", "transformer.resblocks."), ("norm_pre", "ln_pre"), ("norm1", "ln_1"),
             ("norm2", "ln_2"), ("attn.qkv.", "attn.in_proj_"), ("attn.proj", "attn.out_proj"),
             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
    out = {"logit_scale": np.ones((), np.float32), "token_embedding.weight": np.zeros((8, 4), np.float32)}
    for k, v in sd.items():
        if k == "head.bias":
            continue
        if k == "head.weight":
            out["visual.proj"] = v.T
            continue
        if k == "cls_token":
            out["visual.class_embedding"] = v[0, 0]
            continue
        if k == "pos_embed":
            v = v[0]
        if k.startswith("norm."):
            k = k.replace("norm.", "ln_post.")
        for a, b in swaps:
            k = k.replace(a, b)
        out["visual." + k] = v
    return out


@pytest.mark.parametrize("arch, extra", [
    ("vit_small_patch14_dinov2", {}),
    ("vit_giant_patch14_reg4_dinov2", dict(embed_dim=48)),
    ("vit_base_patch16_clip_quickgelu_224", {}),
])
def test_official_layouts_convert_like_timm(arch, extra):
    """Official DINOv2 / OpenAI CLIP files: our renamers equal timm's checkpoint_filter_fn, and the
    converted model matches the timm model they came from."""
    torch, timm = require_reference()
    from timm.models.vision_transformer import checkpoint_filter_fn

    kw = {**_SMALL, **extra, "img_size": 28 if "patch14" in arch else 32}
    ref = _timm(arch, 4, **kw)
    if "clip" in arch:
        with torch.no_grad():
            ref.head.bias.zero_()  # OpenAI's visual projection has no bias
    sd = state_dict_numpy(ref)
    official = _official_openai_clip(sd) if "clip" in arch else _official_dinov2(sd, np.random.default_rng(0))
    want = checkpoint_filter_fn({k: torch.from_numpy(np.asarray(v)) for k, v in official.items()}, ref)
    from bob_jax.families.vit import FAMILY

    got = FAMILY.to_timm_layout(official)
    assert sorted(got) == sorted(want) == sorted(sd)
    for k in want:
        np.testing.assert_allclose(got[k], want[k].numpy(), rtol=0, atol=1e-6, err_msg=k)
    model = backbones.from_timm_state_dict(arch, official, **kw)
    x = np.random.default_rng(4).standard_normal((2, kw["img_size"], kw["img_size"], 3)).astype(np.float32)
    _check(ref, model, x, intermediates=False)


def test_parity_test_can_fail():
    """Mutation test: perturbing one converted tensor must break parity."""
    kw = {**_SMALL, "img_size": 28}
    ref = _timm("vit_small_patch14_reg4_dinov2", 0, **kw)
    sd = state_dict_numpy(ref)
    sd["blocks.1.ls2.gamma"] = sd["blocks.1.ls2.gamma"] * 1.01
    mutated = backbones.from_timm_state_dict("vit_small_patch14_reg4_dinov2", sd, **kw)
    x = np.random.default_rng(0).standard_normal((2, 28, 28, 3)).astype(np.float32)
    _, pooled, _, _ = _torch_outputs(ref, x)
    assert parity_error(backbones.forward(mutated, x)["pooled"], pooled) > 1e-4


def test_conversion_and_kwargs_errors():
    require_reference()
    ref = _timm("vit_small_patch16_224", 0, **_SMALL, img_size=32)
    sd = state_dict_numpy(ref)
    del sd["blocks.0.attn.qkv.bias"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as e:
        backbones.from_timm_state_dict("vit_small_patch16_224", sd, **_SMALL, img_size=32)
    msg = str(e.value)
    assert "blocks.0.attn.qkv.bias" in msg and "extra.weight" in msg
    with pytest.raises(TypeError, match="qk_norm"):
        backbones.from_timm_state_dict("vit_small_patch16_224", {}, qk_norm=True)
    with pytest.raises(ValueError, match="act_layer"):
        backbones.from_timm_state_dict("vit_small_patch16_224", {}, act_layer="relu")


def test_random_init_follows_timm_scheme():
    model = backbones.create("vit_small_patch14_reg4_dinov2.lvd142m", depth=2, img_size=28)
    assert np.allclose(np.asarray(model.blocks[1].ls2.gamma[...]), 1e-5)
    assert float(np.std(np.asarray(model.cls_token[...]))) < 1e-5
    assert 0.015 < float(np.std(np.asarray(model.blocks[0].attn.qkv.kernel[...]))) < 0.025
    out = backbones.forward(model, np.zeros((1, 28, 28, 3), np.float32))
    assert out["pooled"].shape == (1, 384) and out["features"][14].shape == (1, 2, 2, 384)


def test_bfloat16_compute_keeps_float32_parameters():
    import jax.numpy as jnp

    require_reference()
    kw = {**_SMALL, "img_size": 28}
    ref = _timm("vit_small_patch14_reg4_dinov2", 2, **kw)
    sd = state_dict_numpy(ref)
    f32 = backbones.from_timm_state_dict("vit_small_patch14_reg4_dinov2", sd, **kw)
    bf16 = backbones.set_compute_dtype(
        backbones.from_timm_state_dict("vit_small_patch14_reg4_dinov2", sd, **kw), jnp.bfloat16)
    x = np.random.default_rng(2).standard_normal((2, 28, 28, 3)).astype(np.float32)
    want = np.asarray(backbones.forward(f32, x)["pooled"])
    got = backbones.forward(bf16, x)["pooled"]
    assert got.dtype == jnp.bfloat16 and bf16.blocks[0].attn.qkv.kernel[...].dtype == jnp.float32
    assert np.abs(np.asarray(got, np.float32) - want).max() < 0.05 * np.abs(want).max()
