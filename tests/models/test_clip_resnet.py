"""CLIP ResNets vs timm `resnet*_clip` (ByobNet + attention pool): CLIP embedding (logits), pooled,
every stride map; float32, 1e-4. Full-size RN50 at img_size=64 (2x2 attention-pool grid), also run
at 96 px where both sides resample the pos_embed to 3x3 (bicubic, antialias)."""

import numpy as np
import pytest

from bob_jax import backbones
from bob_jax.testing import assert_parity, parity_error
from bob_jax.testing.reference import (
    account_against_timm,
    check_output_scale,
    redraw_parameters,
    require_reference,
    state_dict_numpy,
)

pytestmark = pytest.mark.reference

ZOO_NAMES = ("resnet50_clip.openai", "resnet101_clip.openai", "resnet50x64_clip.openai")


def _timm(arch, seed, **kw):
    torch, timm = require_reference()
    m = redraw_parameters(timm.create_model(arch, pretrained=False, **kw).eval(), seed)
    m.head.fused_attn = False  # explicit attention path (porting.md section 15, item 12)
    return m


@pytest.fixture(scope="module")
def timm_rn50():
    import copy

    first = _timm("resnet50_clip", 0, img_size=64)
    # seed 1: a copy re-drawn (every tensor is replaced), cheaper than building and initialising again
    return {0: first, 1: redraw_parameters(copy.deepcopy(first), 1)}


@pytest.fixture(scope="module")
def flax_rn50(timm_rn50):
    return {seed: backbones.from_timm_state_dict("resnet50_clip", state_dict_numpy(m), img_size=64)
            for seed, m in timm_rn50.items()}


_REFERENCE_CACHE = {}


def _torch_outputs(model, x):
    """timm's forward(x), forward_head(forward_features(x), pre_logits=True) and
    forward_intermediates(x) maps (NHWC), from one trunk pass (final_conv is Identity here)."""
    import torch

    key = (id(model), x.shape, x.tobytes())
    if key not in _REFERENCE_CACHE:
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        with torch.no_grad():
            final, maps = model.forward_intermediates(xt)
            logits = model.forward_head(final).numpy()
            pooled = model.forward_head(final, pre_logits=True).numpy()
        _REFERENCE_CACHE[key] = (logits, pooled, [s.numpy().transpose(0, 2, 3, 1) for s in maps])
    return _REFERENCE_CACHE[key]


def _x(seed, size, chans=3):
    return np.random.default_rng(seed + size).standard_normal((2, size, size, chans)).astype(np.float32)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_accounting_against_timm(name):
    require_reference()
    assert account_against_timm(name) > 300


@pytest.mark.parametrize("seed,size", [(0, 64), (1, 96)])
def test_resnet50_clip_matches_timm(timm_rn50, flax_rn50, seed, size):
    x = _x(seed, size)
    logits, pooled, maps = _torch_outputs(timm_rn50[seed], x)
    check_output_scale(logits)
    model = flax_rn50[seed]
    out = backbones.forward(model, x, intermediates=True)
    assert out["logits"].shape == (2, 1024) and out["pooled"].shape == (2, 2048)
    assert_parity(out["logits"], logits, what="logits (CLIP embedding)")
    assert_parity(out["pooled"], pooled, what="pooled")
    # timm's intermediates: stem.conv3 (stride 2), then stages 0..3 (strides 4..32).
    assert model.feature_info == {2: 64, 4: 256, 8: 512, 16: 1024, 32: 2048}
    assert sorted(out["features"]) == [2, 4, 8, 16, 32]
    for ref, stride in zip(maps, (2, 4, 8, 16, 32)):
        assert out["features"][stride].shape[-1] == model.feature_info[stride]
        assert_parity(out["features"][stride], ref, what=f"stride {stride}")
    inter = out["intermediates"]
    assert len(inter) == 1 + 16
    np.testing.assert_array_equal(inter["stages.3.2"], out["features"][32])


def test_parity_test_can_fail(timm_rn50):
    """Mutation test: perturbing one converted tensor must break parity."""
    sd = state_dict_numpy(timm_rn50[0])
    sd["head.k.weight"] = sd["head.k.weight"] * 1.01
    mutated = backbones.from_timm_state_dict("resnet50_clip", sd, img_size=64)
    x = _x(0, 64)
    logits, _, _ = _torch_outputs(timm_rn50[0], x)
    # intermediates=True: reuses the executable compiled by the parity test
    assert parity_error(backbones.forward(mutated, x, intermediates=True)["logits"], logits) > 1e-4


def test_headless_single_channel(timm_rn50):
    """num_classes=0 drops `head.proj` (timm then returns the pooled map); in_chans=1 stem."""
    import copy

    import torch

    ref = copy.deepcopy(timm_rn50[1])  # == create_model(..., in_chans=1, num_classes=0) re-drawn
    w = ref.stem.conv1.conv.weight[:, :1].clone()
    ref.stem.conv1.conv = torch.nn.Conv2d(1, 32, 3, 2, 1, bias=False)
    ref.stem.conv1.conv.weight.data.copy_(w)
    ref.reset_classifier(0)
    assert not any(k.startswith("head.proj") for k in ref.state_dict())
    model = backbones.from_timm_state_dict("resnet50_clip", state_dict_numpy(ref), img_size=64,
                                           num_classes=0, in_chans=1)
    x = _x(5, 64, chans=1)
    logits, pooled, _ = _torch_outputs(ref, x)
    out = backbones.forward(model, x)
    assert "logits" not in out
    assert_parity(out["pooled"], logits)
    assert_parity(out["pooled"], pooled)
    account_against_timm("resnet50_clip", img_size=64, num_classes=0, in_chans=1)


def test_openai_release_layout_renames_like_timm(timm_rn50, flax_rn50):
    """OpenAI's `visual.*` names (RN50.pt) map to timm's keys exactly as timm's own converter does."""
    import re

    from bob_jax.backbones import _family
    from timm.models.byobnet import _convert_openai_clip

    sd = state_dict_numpy(timm_rn50[0])
    stage_ids = {"conv1_1x1": 1, "conv2_kxk": 2, "conv3_1x1": 3}

    def to_openai(k):
        k = re.sub(r"^stem\.conv(\d)\.conv\.", r"visual.conv\1.", k)
        k = re.sub(r"^stem\.conv(\d)\.bn\.", r"visual.bn\1.", k)
        k = re.sub(r"^stages\.(\d)\.(\d+)\.shortcut\.conv\.conv\.",
                   lambda m: f"visual.layer{int(m[1]) + 1}.{m[2]}.downsample.0.", k)
        k = re.sub(r"^stages\.(\d)\.(\d+)\.shortcut\.conv\.bn\.",
                   lambda m: f"visual.layer{int(m[1]) + 1}.{m[2]}.downsample.1.", k)
        k = re.sub(r"^stages\.(\d)\.(\d+)\.(conv\d_\w+)\.(conv|bn)\.",
                   lambda m: f"visual.layer{int(m[1]) + 1}.{m[2]}.{m[4]}{stage_ids[m[3]]}.", k)
        k = k.replace("head.pos_embed", "visual.attnpool.positional_embedding")
        return re.sub(r"^head\.(q|k|v|proj)\.",
                      lambda m: f"visual.attnpool.{ {'proj': 'c'}.get(m[1], m[1])}_proj.", k)

    openai = {to_openai(k): v for k, v in sd.items()}
    openai["transformer.resblocks.0.attn.in_proj_weight"] = np.zeros((3, 3), np.float32)  # text tower
    assert all(k.startswith("visual.") for k in openai if not k.startswith("transformer."))
    family = _family("resnet50_clip")
    ours = family.to_timm_layout(openai)
    theirs = _convert_openai_clip(openai, timm_rn50[0])
    assert sorted(ours) == sorted(theirs) == sorted(sd)
    model = backbones.from_timm_state_dict("resnet50_clip", openai, img_size=64)
    x = _x(0, 64)
    np.testing.assert_array_equal(backbones.forward(model, x, intermediates=True)["logits"],
                                  backbones.forward(flax_rn50[0], x, intermediates=True)["logits"])


def test_random_init_follows_timm_scheme():
    m = backbones.create("resnet50_clip.openai", seed=3, img_size=64)
    assert m.head.pos_embed.shape == (5, 2048) and m.head.proj.kernel.shape == (2048, 1024)
    k = np.asarray(m.stages[1][0].conv2_kxk.conv.kernel[...])
    assert abs(k.std() / np.sqrt(2 / (9 * 128)) - 1) < 0.05  # normal(0, sqrt(2 / fan_out))
    for stage in m.stages:
        for block in stage:
            assert np.all(np.asarray(block.conv3_1x1.bn.scale[...]) == 0)  # zero_init_last
            assert np.all(np.asarray(block.conv1_1x1.bn.scale[...]) == 1)
    q = np.asarray(m.head.q.kernel[...])
    assert abs(q.std() * np.sqrt(2048) - 1) < 0.05 and np.all(np.asarray(m.head.q.bias[...]) == 0)
    assert abs(np.asarray(m.head.proj.kernel[...]).std() / 0.01 - 1) < 0.05


def test_unsupported_kwargs_are_named():
    with pytest.raises(TypeError, match="output_stride"):
        backbones.from_timm_state_dict("resnet50_clip", {}, output_stride=16)
    with pytest.raises(ValueError, match="global_pool"):
        backbones.from_timm_state_dict("resnet50_clip", {}, global_pool="avg")
