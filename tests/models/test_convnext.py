"""ConvNeXt vs timm `convnext_*`: logits, pooled features and every stage map, float32, 1e-4.

Reduced-size parity (depths (1,1,2,1), dims (16,32,48,64)) covers every variant flag a zoo
checkpoint uses (FB classifier head; VICRegL's norm-before-pool, headless) plus the other supported
kwargs, at two input sizes (80 px exercises the floor of the 2x2/2 downsampling on odd maps);
full-size parity runs convnext_tiny at 64 px. Official-layout (FB / VICRegL) files are tested on
synthetic state dicts derived from timm models.
"""

import numpy as np
import pytest

from bob_jax import backbones
from bob_jax.backbones.zoo import ZOO
from bob_jax.convert import ConversionError, abstract_leaves, apply_rules, shape_stand_in
from bob_jax.families.convnext import FAMILY
from bob_jax.testing import assert_parity, parity_error
from bob_jax.testing.reference import (
    account_against_timm,
    check_output_scale,
    redraw_parameters,
    require_reference,
    state_dict_numpy,
)

pytestmark = pytest.mark.reference

SMALL = dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64))
VICREGL = "convnext_xlarge.vicregl_alpha0p75"
VICREGL_KW = dict(num_classes=0, head_norm_first=True)

# Variant flags: the FB checkpoints (default) and VICRegL (norm -> pool, no head) at two sizes; the
# other supported kwargs at one size (each case costs one XLA compile).
VARIANTS = {
    "fb": {},
    "vicregl": VICREGL_KW,
    "conv_mlp_max_in_chans": dict(
        conv_mlp=True, global_pool="max", in_chans=1, ls_init_value=0.5, num_classes=7
    ),
    "hnf_catavgmax": dict(head_norm_first=True, global_pool="catavgmax", num_classes=5),
}
CASES = [("fb", 64), ("fb", 80), ("vicregl", 64), ("vicregl", 80), ("conv_mlp_max_in_chans", 64),
         ("hnf_catavgmax", 80)]


def _timm(kwargs, seed, arch="convnext_tiny"):
    _, timm = require_reference()
    return redraw_parameters(timm.create_model(arch, pretrained=False, **kwargs).eval(), seed)


def _torch_outputs(model, x):
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        logits = model(xt).numpy()
        pooled = model.forward_head(model.forward_features(xt), pre_logits=True).numpy()
        stages = model.forward_intermediates(xt, intermediates_only=True)
    return logits, pooled, [s.numpy().transpose(0, 2, 3, 1) for s in stages]


def _check(out, ref, x, *, has_head=True):
    logits, pooled, stages = _torch_outputs(ref, x)
    if has_head:
        check_output_scale(logits)
        assert_parity(out["logits"], logits, what="logits")
    else:
        assert "logits" not in out
        check_output_scale(pooled)
    assert_parity(out["pooled"], pooled, what="pooled")
    assert sorted(out["features"]) == [4, 8, 16, 32]
    for stage, stride in zip(stages, (4, 8, 16, 32)):
        assert_parity(out["features"][stride], stage, what=f"stride {stride}")


def _input(seed, size, chans=3):
    return np.random.default_rng(seed + size).standard_normal((2, size, size, chans)).astype(np.float32)


def test_every_zoo_name_is_a_timm_tag_with_its_preprocessing():
    _, timm = require_reference()
    names = [e.name for e in FAMILY.entries]
    assert set(names) <= set(ZOO)
    assert ZOO[VICREGL].default_kwargs() == VICREGL_KW
    assert ZOO[VICREGL].weights.url == "https://dl.fbaipublicfiles.com/vicregl/convnext_xlarge_alpha0.75.pth"
    for entry in FAMILY.entries:
        if entry.name == VICREGL:
            continue
        cfg = timm.models.get_pretrained_cfg(entry.name)
        assert cfg is not None, entry.name
        assert cfg.hf_hub_id == entry.weights.repo
        assert cfg.num_classes == entry.num_classes
        p = entry.preprocess
        want = (p.input_size, p.crop_pct, p.interpolation)
        assert (cfg.input_size[1], cfg.crop_pct, cfg.interpolation) == want
        assert tuple(cfg.mean) == p.mean and tuple(cfg.std) == p.std


def _unique_trees():
    """Zoo names grouped by (arch, kwargs): names sharing a tree are accounted once."""
    groups = {}
    for e in FAMILY.entries:
        groups.setdefault((e.arch, tuple(sorted(e.default_kwargs().items()))), []).append(e.name)
    return [pytest.param(names, dict(kw), id="+".join(names)) for (_, kw), names in groups.items()]


@pytest.mark.parametrize("names,kwargs", _unique_trees())
def test_accounting(names, kwargs):
    """Every zoo name's full-size tree against timm's (meta device, no compute)."""
    assert account_against_timm(names[0], **kwargs) > 0


def _official_from_timm(sd, *, keep_gamma=True):
    """Invert timm's checkpoint_filter_fn: timm keys -> official ConvNeXt / VICRegL keys."""
    import re

    out = {}
    for k, v in sd.items():
        if k.endswith(".gamma") and not keep_gamma:
            continue
        o = k.replace("stem.", "downsample_layers.0.")
        o = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", o)
        o = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", o)
        o = o.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        o = o.replace("head.norm.", "norm.").replace("norm_pre.", "norm.").replace("head.fc.", "head.")
        out[o] = v
    return out


def test_accounting_official_vicregl_layout():
    """The full-size VICRegL file layout (no gamma, final `norm`, no head) fills convnext_xlarge."""
    import torch
    import timm

    with torch.device("meta"):
        ref = timm.create_model("convnext_xlarge", pretrained=False, **VICREGL_KW)
    stand_ins = {k: shape_stand_in(v.shape) for k, v in ref.state_dict().items()}
    sd = _official_from_timm(stand_ins, keep_gamma=False)
    assert "norm.weight" in sd and "downsample_layers.3.1.weight" in sd and not any("gamma" in k for k in sd)
    model = backbones._abstract(FAMILY, "convnext_xlarge", VICREGL_KW)
    targets = abstract_leaves(model)
    n = len(apply_rules(FAMILY.to_timm_layout(sd), FAMILY.timm_rules, targets, check_only=True))
    assert n == len(abstract_leaves(model))


@pytest.fixture(scope="module")
def reduced():
    """(timm model, converted model) per variant, parameters re-drawn (seed 0)."""
    out = {}
    for name, kw in VARIANTS.items():
        ref = _timm({**SMALL, **kw}, seed=0)
        out[name] = ref, backbones.from_timm_state_dict("convnext_tiny", state_dict_numpy(ref), **SMALL, **kw)
    return out


@pytest.mark.parametrize("variant,size", CASES)
def test_reduced_matches_timm(reduced, variant, size):
    ref, model = reduced[variant]
    x = _input(0, size, VARIANTS[variant].get("in_chans", 3))
    _check(backbones.forward(model, x), ref, x, has_head=VARIANTS[variant].get("num_classes", 1000) > 0)


def test_intermediates_are_block_outputs(reduced):
    ref, model = reduced["fb"]
    x = _input(1, 64)
    out = backbones.forward(model, x, intermediates=True)
    blocks = [f"stages.{s}.blocks.{b}" for s, b in ((0, 0), (1, 0), (2, 0), (2, 1), (3, 0))]
    assert set(out["intermediates"]) == {"stem", *blocks}
    import torch

    with torch.no_grad():
        want = ref.stages[2].blocks[0](ref.stages[2].downsample(ref.stages[1](ref.stages[0](
            ref.stem(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))))))
    assert_parity(out["intermediates"]["stages.2.blocks.0"], want.numpy().transpose(0, 2, 3, 1))
    assert model.feature_info == {4: 16, 8: 32, 16: 48, 32: 64} and model.num_features == 64


def test_full_size_convnext_tiny_matches_timm():
    ref = _timm({}, seed=1)
    model = backbones.from_timm_state_dict("convnext_tiny.fb_in1k", state_dict_numpy(ref))
    x = _input(1, 64)
    _check(backbones.forward(model, x), ref, x)


def test_parity_test_can_fail(reduced):
    """Mutation test: perturbing one converted tensor must break parity."""
    ref, _ = reduced["fb"]
    sd = state_dict_numpy(ref)
    sd["stages.2.blocks.1.mlp.fc2.weight"] = sd["stages.2.blocks.1.mlp.fc2.weight"] * 1.01
    mutated = backbones.from_timm_state_dict("convnext_tiny", sd, **SMALL)
    x = _input(0, 64)
    logits, _, _ = _torch_outputs(ref, x)
    assert parity_error(backbones.forward(mutated, x)["logits"], logits) > 1e-4


def test_official_fb_layout_loads_with_head_norm(reduced):
    """Official ConvNeXt classifier files: `norm` is the pool -> norm head (head.norm)."""
    ref, _ = reduced["fb"]
    official = _official_from_timm(state_dict_numpy(ref))
    assert "head.weight" in official and "norm.weight" in official and "stages.0.0.gamma" in official
    model = backbones.from_timm_state_dict("convnext_tiny", official, **SMALL)
    x = _input(2, 64)
    _check(backbones.forward(model, x), ref, x)


def test_vicregl_file_loads_through_create(tmp_path):
    """A VICRegL-layout file (no gamma, final norm before the pool, no head) through `create`,
    checked against timm and against VICRegL's own forward: mean over positions of LN(last map)."""
    import safetensors.numpy
    import torch

    ref = _timm({**SMALL, **VICREGL_KW}, seed=3)
    with torch.no_grad():
        for stage in ref.stages:
            for block in stage.blocks:
                block.gamma.fill_(1.0)  # VICRegL blocks have no layer scale
    official = _official_from_timm(state_dict_numpy(ref), keep_gamma=False)
    path = tmp_path / "v.safetensors"
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in official.items()}, str(path))
    model = backbones.create(VICREGL, weights=path, **SMALL)  # the entry supplies VICREGL_KW
    assert model.preprocess.std == (0.228, 0.224, 0.225)
    x = _input(3, 64)
    out = backbones.forward(model, x)
    _check(out, ref, x, has_head=False)
    # VICRegL ConvNeXt.forward_features: tokens -> LayerNorm(eps 1e-6) -> mean
    last = torch.from_numpy(np.array(out["features"][32]))
    weight, bias = (torch.from_numpy(official[f"norm.{n}"]) for n in ("weight", "bias"))
    want = torch.nn.functional.layer_norm(last, (64,), weight, bias, 1e-6)
    assert_parity(out["pooled"], want.mean(dim=(1, 2)).numpy(), what="VICRegL x_avg")


def test_official_layout_rejects_unknown_keys():
    with pytest.raises(ConversionError, match="not official ConvNeXt"):
        FAMILY.to_timm_layout({"downsample_layers.0.0.weight": np.zeros(1), "projector.weight": np.zeros(1)})


def test_random_init_follows_timm_scheme():
    model = backbones.create("convnext_tiny.fb_in1k", seed=0, **SMALL)
    leaves = {k: np.asarray(v) for k, v in abstract_leaves(model).items()}
    kernel = leaves["stages.2.blocks.1.mlp.fc1.kernel"]
    assert 0.017 < kernel.std() < 0.023 and np.abs(kernel).max() < 2.0
    assert np.all(leaves["stages.1.blocks.0.gamma"] == np.float32(1e-6))
    assert np.all(leaves["head.fc.bias"] == 0) and np.all(leaves["stages.0.blocks.0.conv_dw.bias"] == 0)
    assert np.all(leaves["stem.1.scale"] == 1) and np.all(leaves["head.norm.bias"] == 0)
    out = backbones.forward(model, _input(0, 64))
    assert np.all(np.isfinite(out["logits"])) and out["logits"].shape == (2, 1000)


def test_bfloat16_compute(reduced):
    import jax.numpy as jnp

    ref, _ = reduced["fb"]
    model = backbones.set_compute_dtype(
        backbones.from_timm_state_dict("convnext_tiny", state_dict_numpy(ref), **SMALL), jnp.bfloat16
    )
    x = _input(4, 64)
    want, _, _ = _torch_outputs(ref, x)
    out = backbones.forward(model, x)
    assert out["logits"].dtype == jnp.bfloat16 and out["features"][32].dtype == jnp.bfloat16
    assert model.stages[0].blocks[0].gamma[...].dtype == jnp.float32
    got = np.asarray(out["logits"], np.float32)
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_unsupported_kwargs_are_rejected():
    with pytest.raises(TypeError, match="drop_rate"):  # timm's head dropout: not implemented
        backbones.from_timm_state_dict("convnext_tiny", {}, drop_rate=0.1)
    with pytest.raises(ValueError, match="ls_init_value=None"):
        backbones.create("convnext_tiny.fb_in1k", ls_init_value=None)
    with pytest.raises(ValueError, match="catavgmax"):
        backbones.create("convnext_tiny.fb_in1k", global_pool="catavgmax")
