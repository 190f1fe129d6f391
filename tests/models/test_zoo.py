"""Registry-wide checks: every zoo name builds, is fully covered by its family's random-init
rules, and carries the preprocessing and head size of timm's pretrained config for its tag."""

import functools

import numpy as np
import pytest

from bob_jax import backbones
from bob_jax.backbones import _abstract, _family, zoo
from bob_jax.backbones.zoo_types import HubWeights
from bob_jax.convert import abstract_leaves
from bob_jax.models.init import init_plan

NAMES = backbones.list_backbones()
FAMILY_NAMES = {"resnet", "efficientnet", "clip_resnet", "convnext", "swin", "swinv2", "vit", "eva"}


def test_every_family_is_registered():
    assert {f.name for f in zoo.FAMILIES} == FAMILY_NAMES
    assert len(NAMES) >= 60


@functools.lru_cache(maxsize=None)
def _leaves(arch, kwargs):
    return abstract_leaves(_abstract(_family(arch), arch, dict(kwargs)))


@pytest.mark.parametrize("name", NAMES)
def test_builds_and_init_rules_cover_every_leaf(name):
    entry = zoo.ZOO[name]
    family = _family(entry.arch)
    kwargs = entry.default_kwargs()
    leaves = _leaves(entry.arch, tuple(sorted(kwargs.items())))
    assert leaves
    init_plan(leaves, family.init_rules(family.config(entry.arch, kwargs)))


@pytest.mark.reference
@pytest.mark.parametrize("name", [n for n in NAMES if isinstance(zoo.ZOO[n].weights, HubWeights)])
def test_preprocessing_matches_timm_pretrained_cfg(name, reference):
    torch, timm = reference
    entry = zoo.ZOO[name]
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg is not None, f"timm 1.0.31 has no pretrained cfg for {name}"
    pre = entry.preprocess
    assert pre.input_size == cfg.input_size[-1]
    assert pre.crop_pct == pytest.approx(cfg.crop_pct)
    assert pre.interpolation == cfg.interpolation
    np.testing.assert_allclose(pre.mean, cfg.mean, atol=1e-6)
    np.testing.assert_allclose(pre.std, cfg.std, atol=1e-6)
    assert pre.crop_mode == (cfg.crop_mode or "center")
    assert entry.num_classes == cfg.num_classes


def test_small_members_create_with_random_init():
    for name in ("resnet50.a1_in1k", "convnext_tiny.fb_in1k", "vit_small_patch16_224.augreg_in1k",
                 "swin_tiny_patch4_window7_224.ms_in1k", "eva02_small_patch14_224.mim_in22k",
                 "vit_small_patch14_reg4_dinov2.lvd142m", "swinv2_tiny_window8_256.ms_in1k"):
        model = backbones.create(name, img_size=112) if "resnet" not in name and "convnext" not in name \
            else backbones.create(name)
        assert model.weights_id == "random-init:seed=0" and model.num_features > 0
