"""EVA-02 vs timm `eva02_*`: logits, pooled, the stride-14 patch map and per-block tokens, float32, 1e-4.

Reduced models (depth 2, width 64, 4 heads) cover both layouts a real checkpoint uses: S-style (fused
qkv + q/v bias, packed SwiGLU) and B/L-style (separate q/k/v, split SwiGLU with sub-LN), each with avg
pooling + fc_norm and with token pooling + final norm, at two input sizes (the rope keeps timm's
ref_feat_shape 16x16, so positions are rescaled). Full-size EVA-02-S runs at 112 px.
"""

import numpy as np
import pytest

from bob_jax import backbones
from bob_jax.backbones.zoo import ZOO
from bob_jax.testing import assert_parity, parity_error
from bob_jax.testing.reference import (
    account_against_timm,
    check_output_scale,
    redraw_parameters,
    require_reference,
    state_dict_numpy,
)

pytestmark = pytest.mark.reference

EVA_NAMES = sorted(n for n in ZOO if n.startswith("eva02_"))
REDUCED = dict(depth=2, embed_dim=64, num_heads=4, num_classes=10)
S_STYLE = "eva02_small_patch14_224"  # qkv_fused=True, scale_mlp=False
BL_STYLE = "eva02_base_patch14_224"  # qkv_fused=False, scale_mlp=True


def _timm_model(arch, seed, **kw):
    """timm model with every parameter re-drawn; built on `meta` (timm's own init is thrown away
    anyway) then materialised, and its non-persistent buffers (rope table, zero k bias) recomputed."""
    torch, timm = require_reference()
    from timm.models._manipulate import reinit_non_persistent_buffers

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, **kw)
    model = model.to_empty(device="cpu").eval()
    reinit_non_persistent_buffers(model)
    for block in model.blocks:
        block.attn.fused_attn = False  # explicit attention path (porting.md section 1)
    return redraw_parameters(model, seed)


def _torch_outputs(model, x):
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        feats = model.forward_features(xt)
        pooled = model.forward_head(feats, pre_logits=True).numpy()
        logits = model.forward_head(feats).numpy() if model.num_classes else None
        last = model.forward_intermediates(xt, indices=1, intermediates_only=True)[0]
        blocks = model.forward_intermediates(
            xt, indices=len(model.blocks), return_prefix_tokens=True, intermediates_only=True
        )
    return dict(
        logits=logits,
        pooled=pooled,
        feature=last.numpy().transpose(0, 2, 3, 1),
        blocks=[(p.numpy().transpose(0, 2, 3, 1), c.numpy()[:, 0]) for p, c in blocks],
    )


@pytest.mark.parametrize("name", EVA_NAMES)
def test_accounting_every_zoo_name(name):
    require_reference()
    kw = {"num_classes": ZOO[name].num_classes}
    assert account_against_timm(name, **kw) > 0


@pytest.mark.parametrize(
    "arch, kw",
    [
        (S_STYLE, dict(img_size=112, global_pool="token", num_classes=5)),
        ("eva02_large_patch14_448", dict(img_size=224, num_classes=0)),
    ],
)
def test_accounting_with_kwargs(arch, kw):
    require_reference()
    assert account_against_timm(arch, **kw) > 0


@pytest.mark.parametrize("global_pool", ["avg", "token"])
@pytest.mark.parametrize("arch", [S_STYLE, BL_STYLE])
@pytest.mark.parametrize("size", [56, 84])
def test_reduced_matches_timm(arch, size, global_pool):
    kw = dict(REDUCED, img_size=size, global_pool=global_pool)
    ref = _timm_model(arch, seed=size, **kw)
    model = backbones.from_timm_state_dict(arch, state_dict_numpy(ref), **kw)
    x = np.random.default_rng(size).standard_normal((2, size, size, 3)).astype(np.float32)
    want = _torch_outputs(ref, x)
    check_output_scale(want["logits"])
    out = backbones.forward(model, x, intermediates=True)
    assert_parity(out["logits"], want["logits"], what="logits")
    assert_parity(out["pooled"], want["pooled"], what="pooled")
    assert set(out["features"]) == {14} and model.feature_info == {14: 64}
    assert_parity(out["features"][14], want["feature"], what="stride-14 patch map")
    assert len(out["intermediates"]) == len(want["blocks"]) == 2
    for i, (patch, cls) in enumerate(want["blocks"]):
        got = out["intermediates"][f"blocks.{i}"]
        assert_parity(got["patch"], patch, what=f"blocks.{i} patch tokens")
        assert_parity(got["cls"], cls, what=f"blocks.{i} cls token")


def test_reduced_plain_mlp_without_rope_matches_timm():
    """The remaining arch kwargs: GELU Mlp (swiglu_mlp=False) with sub-LN, no rope, no ref_feat_shape,
    one input channel, avgmax pooling (final norm, no fc_norm)."""
    kw = dict(REDUCED, img_size=56, swiglu_mlp=False, scale_mlp=True, use_rot_pos_emb=False,
              ref_feat_shape=None, qkv_fused=True, mlp_ratio=3.0, in_chans=1, global_pool="avgmax")
    ref = _timm_model(S_STYLE, seed=7, **kw)
    model = backbones.from_timm_state_dict(S_STYLE, state_dict_numpy(ref), **kw)
    x = np.random.default_rng(7).standard_normal((1, 56, 56, 1)).astype(np.float32)
    want = _torch_outputs(ref, x)
    check_output_scale(want["logits"])
    out = backbones.forward(model, x)
    assert_parity(out["logits"], want["logits"], what="logits")
    assert_parity(out["pooled"], want["pooled"], what="pooled")
    assert_parity(out["features"][14], want["feature"], what="stride-14 patch map")


def test_full_size_small_matches_timm():
    """Full-width, full-depth EVA-02-S (the MIM arch, no head) at 112 px to keep CPU cost down."""
    ref = _timm_model(S_STYLE, seed=0, img_size=112)
    model = backbones.from_timm_state_dict(S_STYLE, state_dict_numpy(ref), img_size=112)
    x = np.random.default_rng(0).standard_normal((2, 112, 112, 3)).astype(np.float32)
    want = _torch_outputs(ref, x)
    check_output_scale(want["pooled"])
    out = backbones.forward(model, x)
    assert "logits" not in out and model.num_features == 384
    assert_parity(out["pooled"], want["pooled"], what="pooled")
    assert_parity(out["features"][14], want["feature"], what="stride-14 patch map")


def test_parity_test_can_fail():
    """Mutation test: perturbing one converted tensor (a v bias) must break parity."""
    kw = dict(REDUCED, img_size=56)
    ref = _timm_model(S_STYLE, seed=3, **kw)
    sd = state_dict_numpy(ref)
    sd["blocks.1.attn.v_bias"] = sd["blocks.1.attn.v_bias"] + np.float32(0.05)
    mutated = backbones.from_timm_state_dict(S_STYLE, sd, **kw)
    x = np.random.default_rng(3).standard_normal((1, 56, 56, 3)).astype(np.float32)
    want = _torch_outputs(ref, x)
    assert parity_error(backbones.forward(mutated, x)["logits"], want["logits"]) > 1e-4


def test_random_init_and_contract():
    model = backbones.create("eva02_small_patch14_224.mim_in22k", depth=2, img_size=56)
    assert model.preprocess.mean[0] == pytest.approx(0.48145466) and model.preprocess.crop_pct == 0.9
    k = np.asarray(model.blocks[1].attn.proj.kernel[...])
    assert k.std() == pytest.approx(0.02 / 2.0, rel=0.05)  # fix_init_weight: / sqrt(2 * 2)
    assert np.all(np.asarray(model.blocks[0].attn.q_bias[...]) == 0)
    out = backbones.forward(model, np.zeros((1, 56, 56, 3), np.float32))
    assert out["features"][14].shape == (1, 4, 4, 384) and out["pooled"].shape == (1, 384)
    with pytest.raises(ValueError, match="fixed input size"):
        backbones.forward(model, np.zeros((1, 70, 70, 3), np.float32))


def test_unsupported_kwargs_are_named():
    with pytest.raises(TypeError, match="init_values"):
        backbones.from_timm_state_dict(S_STYLE, {}, init_values=1e-5)
    with pytest.raises(ValueError, match="global_pool"):
        backbones.create("eva02_small_patch14_224.mim_in22k", global_pool="map")
