"""Stochastic depth: `layers.DropPath` semantics, per-block rates against timm for every family, eval
mode unchanged, no extra model state, and masks that are a pure function of the key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bob_jax import backbones
from bob_jax.backbones import zoo
from bob_jax.convert import abstract_leaves, load_leaves
from bob_jax.models.init import ShapeOnlyRngs
from bob_jax.models.layers import DropPath, drop_path_rates

# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------


def _train(rate, stream=0):
    dp = DropPath(rate, stream)
    dp.deterministic = False
    return dp


def test_train_mode_drops_whole_samples_at_the_rate_and_rescales_the_kept():
    n, rate = 20000, 0.25
    x = jnp.ones((n, 2, 3, 4), jnp.float32)
    out = np.asarray(_train(rate)(x, jax.random.key(0)))
    per_sample = out.reshape(n, -1)
    assert np.all(per_sample == per_sample[:, :1])  # one decision per sample
    dropped = per_sample[:, 0] == 0
    kept = per_sample[~dropped, 0]
    np.testing.assert_array_equal(kept, np.float32(1) / np.float32(1 - rate))  # timm scale_by_keep
    # Binomial(n, rate): the dropped fraction within 5 standard deviations of the rate.
    assert abs(dropped.mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
    assert abs(out.mean() - 1.0) < 5 * np.sqrt(rate / (1 - rate) / n)  # unbiased: E[out] = x


def test_masks_are_a_pure_function_of_key_and_stream():
    x = jnp.arange(64 * 3, dtype=jnp.float32).reshape(64, 3)
    key = jax.random.key(7)
    a = np.asarray(_train(0.5, 3)(x, key))
    np.testing.assert_array_equal(a, np.asarray(_train(0.5, 3)(x, key)))
    assert not np.array_equal(a, np.asarray(_train(0.5, 4)(x, key)))  # another block of the model
    assert not np.array_equal(a, np.asarray(_train(0.5, 3)(x, jax.random.key(8))))
    jitted = jax.jit(lambda x, k: _train(0.5, 3)(x, k))
    np.testing.assert_array_equal(a, np.asarray(jitted(x, key)))


def test_gradient_is_the_scaled_mask():
    x = jnp.ones((32, 5), jnp.float32)
    dp, key = _train(0.5), jax.random.key(1)
    grad = jax.grad(lambda x: dp(x, key).sum())(x)
    np.testing.assert_array_equal(grad, dp(x, key))


def test_identity_cases_and_errors():
    x = jnp.ones((4, 3), jnp.float32)
    eval_dp = DropPath(0.5, 0)  # eval mode by default, like the models
    assert eval_dp(x, None) is x
    assert _train(0.0)(x, None) is x  # rate 0 needs no key
    np.testing.assert_array_equal(_train(1.0)(x, jax.random.key(0)), 0.0)  # timm: all dropped, no scaling
    with pytest.raises(ValueError, match=r"rngs=nnx.Rngs\(dropout=key\)"):
        _train(0.1)(x, None)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        DropPath(1.5, 0)
    with pytest.raises(ValueError, match="drop_path_rate"):
        drop_path_rates(-0.1, 4)


def test_rates_are_linspace():
    np.testing.assert_allclose(drop_path_rates(0.3, 7), np.linspace(0, 0.3, 7), rtol=1e-15)
    assert drop_path_rates(0.3, 1) == (0.0,)  # torch.linspace(0, r, 1) == [0]


# --------------------------------------------------------------------------------------------------
# Per-block rates against timm (module names and drop_prob of every timm DropPath)
# --------------------------------------------------------------------------------------------------

RATE_CASES = [
    ("resnet50", dict(drop_path_rate=0.2)),
    ("tf_efficientnet_lite0", dict(drop_path_rate=0.2)),
    ("convnext_tiny", dict(drop_path_rate=0.2)),
    ("swin_tiny_patch4_window7_224", {}),  # timm's Swin default: 0.1, ours too
    ("swinv2_tiny_window8_256", dict(drop_path_rate=0.2)),
    ("vit_small_patch16_224", dict(drop_path_rate=0.2)),
    ("vit_small_patch14_reg4_dinov2", dict(drop_path_rate=0.2)),
    ("eva02_small_patch14_224", dict(drop_path_rate=0.2)),
    ("resnet50_clip", dict(drop_path_rate=0.2)),
]


def _abstract(arch, kwargs):
    family = zoo.ARCH_TO_FAMILY[arch]
    cfg = family.config(arch, kwargs)
    return nnx.eval_shape(lambda: family.model(cfg, rngs=ShapeOnlyRngs()))


@pytest.mark.reference
@pytest.mark.parametrize("arch, kwargs", RATE_CASES, ids=[a for a, _ in RATE_CASES])
def test_per_block_rates_match_timm(reference, arch, kwargs):
    torch, timm = reference
    from timm.layers import DropPath as TimmDropPath

    with torch.device("meta"):  # the module tree only: no weights are drawn
        tmodel = timm.create_model(arch, pretrained=False, **kwargs)
    want = {n: m.drop_prob for n, m in tmodel.named_modules() if isinstance(m, TimmDropPath)}
    model = _abstract(arch, kwargs)
    got = {".".join(map(str, p)): m.rate for p, m in nnx.iter_modules(model) if isinstance(m, DropPath)}
    assert want and set(got) == set(want)
    for name, rate in want.items():
        assert got[name] == pytest.approx(rate, rel=1e-6, abs=1e-9), name  # timm: float32 linspace
    streams = [m.stream for _, m in nnx.iter_modules(model) if isinstance(m, DropPath)]
    assert len(set(streams)) == len(streams)  # independent masks per DropPath


# --------------------------------------------------------------------------------------------------
# Placement: at rate 1 every residual block reduces to its shortcut (timm drops the branch only)
# --------------------------------------------------------------------------------------------------


def _block(family_name):
    """(a constructor of one residual block of the family at rate 1, its inputs, expected output)."""
    from bob_jax.models import clip_resnet, convnext, efficientnet, eva, resnet, swin, swinv2, vit

    x = jax.random.normal(jax.random.key(1), (6, 8, 8, 16), jnp.float32)
    tokens = x.reshape(6, 64, 16)
    relu_x = jax.nn.relu(x)  # the ResNets' block ends with relu(branch + shortcut)
    if family_name == "eva":
        cfg = eva.EvaConfig.make(img_size=112, patch_size=14, embed_dim=16, num_heads=1)  # 8 x 8 grid
        with_cls = jnp.concatenate([tokens[:, :1], tokens], axis=1)
        rope = jnp.asarray(eva.rope_table(cfg.grid_size, cfg.head_dim, cfg.ref_feat_shape))
        return lambda rngs: eva.EvaBlock(cfg, 1.0, 0, rngs=rngs), (with_cls, rope), with_cls
    vit_cfg = vit.ViTConfig(embed_dim=16, num_heads=2, init_values=0.5)
    return {
        "resnet": (lambda rngs: resnet.Bottleneck(16, 4, 1, 1.0, 0, rngs=rngs), (x,), relu_x),
        "efficientnet": (lambda rngs: efficientnet.InvertedResidual(16, 16, 3, 1, 6, 1.0, 0, rngs=rngs), (x,), x),
        "convnext": (lambda rngs: convnext.ConvNeXtBlock(16, 0.5, 1.0, 0, rngs=rngs), (x,), x),
        "swin": (lambda rngs: swin.SwinTransformerBlock(16, 2, (4, 4), (2, 2), 2.0, 1.0, 0, rngs=rngs), (x,), x),
        "swinv2": (lambda rngs: swinv2.SwinTransformerV2Block(16, 2, (4, 4), (2, 2), 2.0, (0, 0), 1.0, 0,
                                                               rngs=rngs), (x,), x),
        "vit": (lambda rngs: vit.Block(vit_cfg, 1.0, 0, rngs=rngs), (tokens,), tokens),
        "clip_resnet": (lambda rngs: clip_resnet.BottleneckBlock(16, 16, 1, 1.0, 0, rngs=rngs), (x,), relu_x),
    }[family_name]


def _random_block(make, seed=0):
    """Every parameter N(0, 0.2^2), BN variances U(0.5, 1.5): no branch is zero (timm zero-inits some,
    ViT's Dense starts at 0). Built abstractly and filled from numpy: eager NNX init is slow on CPU."""
    block = nnx.eval_shape(lambda: make(ShapeOnlyRngs()))
    rng = np.random.default_rng(seed)
    leaves = {p: (rng.uniform(0.5, 1.5, v.shape) if p.endswith(".var") else 0.2 * rng.standard_normal(v.shape))
              for p, v in abstract_leaves(block).items()}
    return load_leaves(block, leaves)


BLOCK_FAMILIES = ["clip_resnet", "convnext", "efficientnet", "eva", "resnet", "swin", "swinv2", "vit"]


def test_every_family_is_covered():
    assert sorted(f.name for f in zoo.FAMILIES) == BLOCK_FAMILIES
    assert {zoo.ARCH_TO_FAMILY[a].name for a, _ in RATE_CASES} == set(BLOCK_FAMILIES)
    assert all("drop_path_rate" in f.arch_kwargs for f in zoo.FAMILIES)


@pytest.mark.parametrize("family_name", BLOCK_FAMILIES)
def test_rate_one_drops_exactly_the_residual_branch(family_name):
    make, args, shortcut_only = _block(family_name)
    block = _random_block(make)

    keep_def, state = nnx.split(block)  # eval mode
    block.set_attributes(DropPath, deterministic=False)  # DropPath in train mode, BatchNorm unchanged
    drop_def, _ = nnx.split(block)

    @jax.jit  # one compile for both modes beats eager op-by-op dispatch on CPU
    def both_modes(state, *args):
        key = jax.random.key(0)
        return nnx.merge(keep_def, state)(*args, key), nnx.merge(drop_def, state)(*args, key)

    kept, dropped = both_modes(state, *args)
    assert not np.allclose(kept, shortcut_only, atol=1e-3)  # the branch matters when it is kept
    np.testing.assert_allclose(dropped, shortcut_only, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, kwargs", RATE_CASES, ids=[a for a, _ in RATE_CASES])
def test_no_extra_state_and_eval_mode_after_create(arch, kwargs):
    """DropPath is stateless, so rate 0 and rate > 0 hold the same variables (shared checkpoints,
    unchanged parity); a created model is in eval mode, where DropPath is the identity."""
    plain = _abstract(arch, {**kwargs, "drop_path_rate": 0.0})
    dropping = _abstract(arch, {**kwargs, "drop_path_rate": 0.3})
    assert jax.tree.map(np.shape, abstract_leaves(plain)) == jax.tree.map(np.shape, abstract_leaves(dropping))
    assert not any(isinstance(m, DropPath) for _, m in nnx.iter_modules(plain))
    dropping.train()
    dropping.eval()  # what backbones.create does last
    paths = [m for _, m in nnx.iter_modules(dropping) if isinstance(m, DropPath)]
    assert paths and all(m.deterministic for m in paths)


def _tiny_vit(rate):
    return backbones.create("vit_small_patch16_224.augreg_in1k", drop_path_rate=rate, depth=3, embed_dim=32,
                            num_heads=2, img_size=32, patch_size=8, num_classes=3)


@pytest.mark.parametrize("make", [_tiny_vit], ids=["vit"])
def test_model_eval_unchanged_and_train_masks_follow_the_key(make):
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3), jnp.float32)
    plain, dropping = make(0.0), make(0.5)  # same seed: same weights
    want = np.asarray(plain(x)["logits"])
    np.testing.assert_array_equal(dropping(x)["logits"], want)  # eval mode: bit-identical to rate 0
    np.testing.assert_array_equal(dropping(x, rngs=nnx.Rngs(dropout=1))["logits"], want)
    dropping.train()
    with pytest.raises(ValueError, match="rngs="):
        dropping(x)
    a = np.asarray(dropping(x, rngs=nnx.Rngs(dropout=1))["logits"])
    np.testing.assert_array_equal(a, dropping(x, rngs=nnx.Rngs(dropout=1))["logits"])  # same key, same masks
    assert not np.array_equal(a, dropping(x, rngs=nnx.Rngs(dropout=2))["logits"])
    assert not np.array_equal(a, want)


def test_create_accepts_drop_path_rate_and_checks_it():
    model = _tiny_vit(0.3)
    assert model.cfg.drop_path_rate == 0.3
    rates = [m.rate for _, m in nnx.iter_modules(model) if isinstance(m, DropPath)]
    assert rates == pytest.approx([0.15, 0.15, 0.3, 0.3])  # block 0 has rate 0: no DropPath
    with pytest.raises(ValueError, match="drop_path_rate"):
        backbones.create("resnet50.a1_in1k", drop_path_rate=1.5)
