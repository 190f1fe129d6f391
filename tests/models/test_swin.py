"""Swin v1 / SwinV2 vs timm: accounting of every zoo name, reduced-size parity at two input sizes
(window clamping, shifted windows with padding, pretrained_window_sizes), full-size Swin-T at 224,
timm's buffers vs our constants, the MiDaS DPT renamer, random init and a mutation test."""

import math

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

V1 = "swin_tiny_patch4_window7_224"
V2 = "swinv2_tiny_window8_256"
# depths (1, 1, 2, 1), patch 4: stage maps 16/8/4/2 at 64 px (window 3) and 24/12/6/3 at 96 px (window 4),
# so stage 2 runs a shifted block whose map is padded to a window multiple (4 -> 6, 6 -> 8) and stage 3
# clamps its window to the map (2x2 resp. 3x3, no shift). Unpadded shifts: the full-size Swin-T test.
SMALL = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), num_classes=10)
CASES = {
    (V1, 64): dict(SMALL, img_size=64, window_size=3),
    (V1, 96): dict(SMALL, img_size=96, window_size=4),
    (V2, 64): dict(SMALL, img_size=64, window_size=3),
    (V2, 96): dict(SMALL, img_size=96, window_size=4, pretrained_window_sizes=(2, 2, 6, 2)),
}
SWIN_NAMES = sorted(n for n, e in ZOO.items() if e.arch.startswith("swin"))
SWIN_ARCHS = sorted({ZOO[n].arch for n in SWIN_NAMES})


def _timm(arch, seed, **kw):
    """timm model with every parameter re-drawn; built on `meta` (timm's own init would be thrown
    away), materialised, and its non-persistent buffers (index, coords table, k bias, masks) recomputed."""
    torch, timm = require_reference()
    from timm.models._manipulate import reinit_non_persistent_buffers

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, **kw)
    model = model.to_empty(device="cpu").eval()
    reinit_non_persistent_buffers(model)
    return redraw_parameters(model, seed)


@pytest.fixture(scope="module")
def pairs():
    """(arch, size) -> (timm model, bob_jax model) with re-drawn parameters."""
    require_reference()
    out = {}
    for (arch, size), kw in CASES.items():
        ref = _timm(arch, size, **kw)
        out[arch, size] = ref, backbones.from_timm_state_dict(arch, state_dict_numpy(ref), **kw)
    return out


def _torch_outputs(model, x):
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        logits = model(xt).numpy()
        pooled = model.forward_head(model.forward_features(xt), pre_logits=True).numpy()
        stages = model.forward_intermediates(xt, intermediates_only=True)
    return logits, pooled, [s.numpy().transpose(0, 2, 3, 1) for s in stages]


def _x(size, batch=2, seed=0):
    return np.random.default_rng(seed + size).standard_normal((batch, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("arch", SWIN_ARCHS)
def test_accounting_every_zoo_arch(arch):
    """Key and shape accounting against timm (meta device) for the arch of every zoo name."""
    require_reference()
    assert account_against_timm(arch) > 0
    assert {ZOO[n].arch for n in SWIN_NAMES} == set(SWIN_ARCHS) and len(SWIN_NAMES) == 11


@pytest.mark.parametrize("arch,size", list(CASES))
def test_reduced_matches_timm(pairs, arch, size):
    ref, model = pairs[arch, size]
    x = _x(size)
    logits, pooled, stages = _torch_outputs(ref, x)
    check_output_scale(logits)
    out = backbones.forward(model, x)
    assert_parity(out["logits"], logits, what="logits")
    assert_parity(out["pooled"], pooled, what="pooled")
    assert sorted(out["features"]) == [4, 8, 16, 32] == sorted(model.feature_info)
    for stage, stride in zip(stages, (4, 8, 16, 32)):
        assert model.feature_info[stride] == stage.shape[-1]
        assert_parity(out["features"][stride], stage, what=f"stride {stride}")


@pytest.mark.parametrize("arch,size", list(CASES))
def test_geometry_and_constants_match_timm_buffers(pairs, arch, size):
    """Clamped window/shift per block and our relative_position_index / relative_coords_table /
    k_bias / attn_mask constants equal timm's (non-persistent) buffers."""
    from bob_jax.models import swin, swinv2

    ref, model = pairs[arch, size]
    seen_shift = seen_clamp = False
    for ref_stage, stage in zip(ref.layers, model.layers):
        for ref_blk, blk in zip(ref_stage.blocks, stage.blocks):
            assert blk.window == tuple(ref_blk.window_size) and blk.shift == tuple(ref_blk.shift_size)
            seen_shift |= any(blk.shift)
            seen_clamp |= blk.window != model.cfg.window_size[-1]
            a = ref_blk.attn
            want_index = a.relative_position_index.numpy()
            np.testing.assert_array_equal(swin.relative_position_index(*blk.window), want_index)
            if arch == V2:
                pre = blk.attn.pretrained_window
                np.testing.assert_allclose(swinv2.relative_coords_table(*blk.window, *pre),
                                           a.relative_coords_table.numpy().reshape(-1, 2), rtol=0, atol=1e-6)
                assert not a.k_bias.numpy().any()
            if any(blk.shift):
                res = ref_stage.blocks[0].input_resolution
                hp = math.ceil(res[0] / blk.window[0]) * blk.window[0]
                wp = math.ceil(res[1] / blk.window[1]) * blk.window[1]
                np.testing.assert_array_equal(swin.shift_attn_mask(hp, wp, blk.window, blk.shift),
                                              ref_blk.attn_mask.numpy())
            else:
                assert ref_blk.attn_mask is None
    assert seen_shift and seen_clamp


def test_full_size_swin_tiny_224():
    ref = _timm(V1, 0)
    model = backbones.from_timm_state_dict(V1, state_dict_numpy(ref))
    x = _x(224, batch=1)
    logits, pooled, stages = _torch_outputs(ref, x)
    check_output_scale(logits)
    out = backbones.forward(model, x)
    assert_parity(out["logits"], logits, what="logits")
    assert_parity(out["pooled"], pooled, what="pooled")
    for stage, stride in zip(stages, (4, 8, 16, 32)):
        assert_parity(out["features"][stride], stage, what=f"stride {stride}")


@pytest.mark.parametrize("arch,key", [
    (V1, "layers.2.blocks.1.attn.relative_position_bias_table"),
    (V2, "layers.2.blocks.1.attn.cpb_mlp.2.weight"),
])
def test_parity_test_can_fail(pairs, arch, key):
    """Mutation test: perturbing one converted tensor (of a shifted block) must break parity."""
    ref, _ = pairs[arch, 64]
    sd = state_dict_numpy(ref)
    sd[key] = sd[key] * 1.05
    mutated = backbones.from_timm_state_dict(arch, sd, **CASES[arch, 64])
    x = _x(64)
    logits, _, _ = _torch_outputs(ref, x)
    assert parity_error(backbones.forward(mutated, x)["logits"], logits) > 1e-4


def _to_midas_dpt(sd: dict) -> dict:
    """A MiDaS v3.1 DPT-layout dict from a timm SwinV2 state dict: stage-end PatchMerging
    (`layers.{i+1}.downsample` -> `layers.i.downsample`), `head.fc.` -> `head.`, everything under
    `pretrained.model.`, timm-0.6 persistent buffers, plus a DPT neck/head to be dropped."""
    import re

    out = {}
    for k, v in sd.items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out["pretrained.model." + k.replace("head.fc.", "head.")] = v
    out["pretrained.model.layers.2.blocks.1.attn_mask"] = np.zeros((4, 9, 9), np.float32)
    out["pretrained.model.layers.2.blocks.1.attn.relative_position_index"] = np.zeros((9, 9), np.int64)
    out["pretrained.model.layers.2.blocks.1.attn.relative_coords_table"] = np.zeros((1, 5, 5, 2), np.float32)
    out["scratch.layer1_rn.weight"] = np.zeros((8, 32, 3, 3), np.float32)
    out["scratch.refinenet1.out_conv.weight"] = np.zeros((8, 8, 1, 1), np.float32)
    out["scratch.output_conv.0.weight"] = np.zeros((4, 8, 3, 3), np.float32)
    out["pretrained.act_postprocess1.0.weight"] = np.zeros((3,), np.float32)
    return out


def test_midas_dpt_renamer(pairs):
    ref, model = pairs[V2, 64]
    dpt = _to_midas_dpt(state_dict_numpy(ref))
    assert "pretrained.model.layers.0.downsample.reduction.weight" in dpt
    from_dpt = backbones.from_timm_state_dict(V2, dpt, **CASES[V2, 64])
    x = _x(64)
    want = backbones.forward(model, x)["logits"]
    np.testing.assert_array_equal(backbones.forward(from_dpt, x)["logits"], want)
    # The registered MiDaS names resolve to the SwinV2 family with the DPT layout, head dropped on request.
    for name in ("swinv2_tiny_window16_256.midas_v31", "swinv2_base_window12to24_192to384.midas_v31"):
        assert name in ZOO and ZOO[name].preprocess.mean == (0.5, 0.5, 0.5)
    kw = {k: v for k, v in CASES[V2, 64].items() if k != "num_classes"}
    headless = backbones.from_timm_state_dict(
        V2, {k: v for k, v in dpt.items() if not k.startswith("pretrained.model.head.")}, num_classes=0, **kw)
    assert headless.head is None and headless.num_features == 256


def test_random_init_follows_timm():
    from bob_jax.convert import abstract_leaves

    kw = {k: v for k, v in CASES[V2, 64].items()}
    model = backbones.create("swinv2_tiny_window8_256.ms_in1k", seed=0, **kw)
    leaves = {k: np.asarray(v) for k, v in abstract_leaves(model).items()}
    np.testing.assert_allclose(leaves["layers.0.blocks.0.attn.logit_scale"], math.log(10), rtol=1e-6)
    assert not leaves["layers.2.blocks.1.norm1.scale"].any()  # residual post-norms start at zero
    assert np.all(leaves["layers.2.downsample.norm.scale"] == 1)
    assert abs(leaves["layers.2.blocks.1.attn.qkv.kernel"].std() - 0.02) < 0.003
    model = backbones.create("swin_tiny_patch4_window7_224.ms_in1k", seed=0, **CASES[V1, 64])
    leaves = {k: np.asarray(v) for k, v in abstract_leaves(model).items()}
    assert abs(leaves["layers.2.blocks.1.attn.relative_position_bias_table"].std() - 0.02) < 0.006
    bound = 1 / math.sqrt(3 * 4 * 4)  # patch conv keeps torch's default U(+-1/sqrt(fan_in))
    assert 0.9 * bound < np.abs(leaves["patch_embed.proj.kernel"]).max() <= bound


def test_unsupported_kwarg_is_named():
    with pytest.raises(TypeError, match="drop_rate"):  # timm's head dropout: not implemented
        backbones.from_timm_state_dict(V1, {}, drop_rate=0.1)
    with pytest.raises(TypeError, match="pretrained_window_sizes"):
        backbones.from_timm_state_dict(V1, {}, pretrained_window_sizes=(0, 0, 0, 0))


def test_v1_tables_resized_like_timm_for_another_img_size(pairs):
    """Weights for 96 px loaded at 64 px: the clamped stage-3 window shrinks its bias table, which
    our `adapt` resizes exactly as timm's checkpoint_filter_fn (no compile: tables compared)."""
    import torch
    from timm.models.swin_transformer import checkpoint_filter_fn

    from bob_jax.convert import abstract_leaves

    ref, _ = pairs[V1, 96]
    sd = state_dict_numpy(ref)
    kw = dict(CASES[V1, 96], img_size=64)
    target = _timm(V1, 0, **kw)
    want = checkpoint_filter_fn({k: torch.from_numpy(v) for k, v in sd.items()}, target)
    target.load_state_dict(want)  # timm accepts its own resized tables
    leaves = abstract_leaves(backbones.from_timm_state_dict(V1, sd, **kw))
    key = "layers.3.blocks.0.attn.relative_position_bias_table"
    assert sd[key].shape != tuple(want[key].shape)
    for i, stage in enumerate(target.layers):
        for b in range(len(stage.blocks)):
            key = f"layers.{i}.blocks.{b}.attn.relative_position_bias_table"
            np.testing.assert_array_equal(np.asarray(leaves[key]), want[key].numpy())
