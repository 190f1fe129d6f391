"""DINOv2-style multi-head linear evaluation: the descriptor against timm, joint training against separate
single-head SGD runs (optax), head selection, the stratified held-out split and the task end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bob_jax import backbones, parallel
from bob_jax.evaluate.calibration import calibration_metrics
from bob_jax.features import DESCRIPTORS, Features, extract_features
from bob_jax.frozen import TASKS
from bob_jax.tasks.linear_multihead import (
    DESCRIPTOR,
    MultiHeadConfig,
    Variant,
    feature_output,
    has_token_layout,
    init_heads,
    last_blocks_descriptor,
    make_variants,
    run_linear_multihead,
    select_head,
    stratified_holdout,
    train_heads,
)
from bob_jax.tasks.linear_probe import EpochBatchIndices
from bob_jax.testing import assert_parity
from bob_jax.testing.reference import redraw_parameters, require_reference, state_dict_numpy

_TINY = dict(depth=5, embed_dim=32, num_heads=2, num_classes=0)


def _timm(arch, seed, **kw):
    torch, timm = require_reference()
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, **kw)
    model = model.to_empty(device="cpu").eval()
    from timm.models._manipulate import reinit_non_persistent_buffers

    reinit_non_persistent_buffers(model)
    for block in model.blocks:
        block.attn.fused_attn = False
    return redraw_parameters(model, seed)


@pytest.mark.reference
@pytest.mark.parametrize(
    "arch, kw",
    [
        ("vit_small_patch16_224", dict(img_size=32)),  # class token, final norm
        ("vit_small_patch14_reg4_dinov2", dict(img_size=28)),  # registers: excluded from the patch average
        ("vit_small_patch16_224", dict(img_size=32, global_pool="avg")),  # fc_norm model: norm is identity
        ("eva02_small_patch14_224", dict(img_size=28, global_pool="token")),
    ],
)
def test_descriptor_matches_timm_forward_intermediates(arch, kw):
    torch, _ = require_reference()
    ref = _timm(arch, 3, **_TINY, **kw)
    model = backbones.from_timm_state_dict(arch, state_dict_numpy(ref), **_TINY, **kw)
    size = kw["img_size"]
    x = np.random.default_rng(0).standard_normal((2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        blocks = ref.forward_intermediates(
            torch.from_numpy(x.transpose(0, 3, 1, 2)),
            indices=4,
            norm=True,
            return_prefix_tokens=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
    want = np.concatenate(
        [prefix[:, 0].numpy() for _, prefix in blocks] + [blocks[-1][0].numpy().mean(1)], -1
    )
    assert DESCRIPTORS[DESCRIPTOR] is last_blocks_descriptor and has_token_layout(model)
    graphdef, state = nnx.split(model)
    got = np.asarray(jax.jit(lambda s, x: last_blocks_descriptor(nnx.merge(graphdef, s), x))(state, x))
    assert got.shape == (2, 5 * 32)
    assert_parity(got, want, what=f"{arch} {DESCRIPTOR}")


def test_feature_output_and_extraction_through_the_registry():
    vit = backbones.create("vit_small_patch16_224.augreg_in1k", weights=None, img_size=32, **_TINY)
    shallow = backbones.create(
        "vit_small_patch16_224.augreg_in1k", weights=None, img_size=32, **{**_TINY, "depth": 3}
    )
    no_cls = backbones.create(
        "vit_small_patch16_224.augreg_in1k",
        weights=None,
        img_size=32,
        class_token=False,
        global_pool="avg",
        **_TINY,
    )
    assert feature_output(vit, {}) == DESCRIPTOR
    assert feature_output(shallow, {}) == feature_output(no_cls, {}) == "pooled"
    with pytest.raises(ValueError, match="class token"):
        last_blocks_descriptor(shallow, jnp.zeros((1, 32, 32, 3)))

    class Source:
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"image": np.full((32, 32, 3), 20 * i, np.uint8), "label": i % 3}

        def describe(self):
            return {"name": "ramp10"}

    # The job's path: the registered descriptor inside the jitted, sharded extraction (values: test above).
    pre = vit.preprocess.replace(input_size=32)
    feats = extract_features(vit, Source(), preprocess=pre, batch_size=8, output=DESCRIPTOR, progress=False)
    assert feats.features.shape == (10, 160) and feats.output == DESCRIPTOR
    assert np.all(np.isfinite(feats.features)) and np.std(feats.features[:, -32:], axis=0).min() > 0


def test_variants_are_dinov2_inputs():
    """Columns of [cls_{L-3}, cls_{L-2}, cls_{L-1}, cls_L, avgpool] for each (n, avgpool), DINOv2's order."""
    d = 3
    row = np.repeat(np.arange(5), d)  # chunk j holds the value j: 0..3 class tokens, 4 avgpool
    config = MultiHeadConfig(n_last_blocks=(1, 4), avgpool=(False, True))
    got = [
        (v.n_blocks, v.avgpool, tuple(np.unique(row[v.start : v.stop])))
        for v in make_variants(DESCRIPTOR, 5 * d, config)
    ]
    assert got == [(1, False, (3,)), (1, True, (3, 4)), (4, False, (0, 1, 2, 3)), (4, True, (0, 1, 2, 3, 4))]
    assert make_variants("pooled", 7, config) == [Variant(0, False, 0, 7)]
    with pytest.raises(ValueError, match="multiple of 5"):
        make_variants(DESCRIPTOR, 12, config)
    with pytest.raises(ValueError, match="n_last_blocks"):
        MultiHeadConfig(n_last_blocks=(5,))


def test_stratified_holdout():
    labels = np.repeat(np.arange(4), [50, 20, 9, 1])
    fit, val = stratified_holdout(labels, 0.2, seed=3)
    assert np.array_equal(np.sort(np.concatenate([fit, val])), np.arange(len(labels)))
    assert [int(np.sum(labels[val] == c)) for c in range(4)] == [
        10,
        4,
        2,
        0,
    ]  # one-example class stays in fit
    again, _ = stratified_holdout(labels, 0.2, seed=3)
    other = stratified_holdout(labels, 0.2, seed=4)[1]
    assert np.array_equal(again, fit) and not np.array_equal(other, val)
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_holdout(np.arange(5), 0.1, seed=0)  # one example per class: nothing to hold out


def test_joint_training_equals_separate_single_head_runs():
    """All heads in one jitted step (8-device batch sharding) == each head alone with optax SGD + cosine."""
    rng = np.random.default_rng(0)
    n, d, classes, batch, steps = 96, 4, 3, 32, 10  # 10 steps: three passes of 3 batches and one more
    x = rng.standard_normal((n, 5 * d)).astype(np.float32)
    y = rng.integers(0, classes, n)
    variants = make_variants(DESCRIPTOR, 5 * d, MultiHeadConfig())
    lrs = [0.01, 0.1, 0.5]
    init = init_heads(variants, len(lrs), classes, init_std=0.01, seed=1)
    joint = train_heads(
        init,
        x,
        y,
        variants,
        lrs,
        batch_size=batch,
        steps=steps,
        momentum=0.9,
        seed=5,
        mesh=parallel.make_mesh(),
    )
    sampler = EpochBatchIndices(n, batch, 5)
    order = np.stack([sampler(t) for t in range(steps)])  # [steps, batch]: the same batches, in order

    @jax.jit
    def single_head(p, lr, xs, ys):
        """One head alone: optax SGD (momentum 0.9) with a cosine decay to 0 over the run."""
        tx = optax.sgd(optax.cosine_decay_schedule(lr, steps), momentum=0.9)

        def step(carry, batch):
            p, state = carry
            grads = jax.grad(
                lambda q: optax.softmax_cross_entropy_with_integer_labels(
                    batch[0] @ q["w"] + q["b"], batch[1]
                ).mean()
            )(p)
            updates, state = tx.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), None

        return jax.lax.scan(step, (p, tx.init(p)), (xs, ys))[0][0]

    moved = 0.0
    for v, head, start in zip(variants, joint, init, strict=True):
        for k, lr in enumerate(lrs):
            p = single_head(
                {"w": start["w"][k], "b": start["b"][k]}, lr, x[order][..., v.start : v.stop], y[order]
            )
            np.testing.assert_allclose(np.asarray(head["w"][k]), np.asarray(p["w"]), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(head["b"][k]), np.asarray(p["b"]), rtol=1e-5, atol=1e-6)
            moved = max(moved, float(np.max(np.abs(np.asarray(p["w"]) - start["w"][k]))))
    assert moved > 0.1  # the heads trained (a comparison of untouched weights proves nothing)


def test_select_head_first_maximum_in_dinov2_order():
    acc = np.array([[0.2, 0.5, 0.5], [0.1, 0.5, 0.4]])
    assert select_head(acc) == (0, 1)
    assert select_head(np.array([[0.1, 0.2], [0.3, 0.1]])) == (1, 0)


def _token_problem(means, per_class, seed, signal_chunk=0):
    """Features in the DESCRIPTOR layout whose class signal sits in one chunk only; the rest is noise."""
    classes, d = means.shape
    y = np.repeat(np.arange(classes), per_class)
    x = np.random.default_rng(seed).standard_normal((len(y), 5 * d))
    x[:, signal_chunk * d : (signal_chunk + 1) * d] += means[y]
    return x.astype(np.float32), y


def test_selection_and_end_to_end_on_a_constructed_problem(tmp_path):
    """Class signal only in cls_{L-3}: only n=4 heads can learn it, and only with the larger lr."""
    means = np.random.default_rng(0).standard_normal((4, 8)) * 4.0
    x, y = _token_problem(means, 100, seed=1)
    tx, ty = _token_problem(means, 25, seed=2)
    config = MultiHeadConfig(
        base_lrs=(1e-6, 0.5), epochs=8, epoch_length=0, batch_size=64, val_fraction=0.25, seed=1
    )
    metrics, correct = run_linear_multihead(
        x, y, tx, ty, num_classes=4, output=DESCRIPTOR, config=config, workdir=str(tmp_path)
    )
    assert metrics["chosen_n_blocks"] == 4 and metrics["chosen_base_lr"] == 0.5
    assert metrics["chosen_lr"] == 0.5 * 64 / 256 and metrics["batch_size"] == 64
    assert metrics["num_heads"] == 8 and metrics["num_val"] == 100 and metrics["num_train"] == 300
    for n in (1, 4):
        for avg in (0, 1):
            assert metrics[f"val_top1/n={n},avgpool={avg},lr=1e-06"] < 0.6
    assert metrics["val_top1/n=1,avgpool=0,lr=0.5"] < 0.6
    assert metrics["val_top1"] > 0.95 and metrics["top1"] > 0.95
    assert metrics["top1"] == pytest.approx(correct.mean())
    record = json.loads((tmp_path / "heads.json").read_text())
    assert len(record["heads"]) == 8 and record["chosen"]["val_top1"] == metrics["val_top1"]
    held = np.load(tmp_path / "heldout_indices.npy")
    assert np.array_equal(held, stratified_holdout(y, 0.25, 1)[1])


def test_task_entry_pooled_fallback_and_calibration():
    """Through frozen.TASKS: a CNN's pooled features give one variant under the lr grid; top1 / NLL / ECE of
    the chosen head equal calibration_metrics on its logits (recomputed from a single-variant run)."""
    rng = np.random.default_rng(2)
    means = rng.standard_normal((3, 6)) * 1.5
    y, ty = rng.integers(0, 3, 240), rng.integers(0, 3, 90)
    x = (means[y] + rng.standard_normal((240, 6))).astype(np.float32)
    tx = (means[ty] + rng.standard_normal((90, 6))).astype(np.float32)
    cfg = dict(
        base_lrs=(1e-3, 0.1),
        n_last_blocks=(1, 4),
        avgpool=(False, True),
        epochs=5,
        epoch_length=20,
        batch_size=32,
        momentum=0.9,
        init_std=0.01,
        val_fraction=0.2,
        seed=0,
    )
    task = TASKS["linear_multihead"]
    assert task.primary_metric == "top1"
    metrics, correct = task.run(
        Features(x, y, "k"),
        Features(tx, ty, "k"),
        num_classes=3,
        cfg=cfg,
        mesh=parallel.make_mesh(),
        workdir=None,
        progress=False,
    )
    assert metrics["token_layout"] == 0 and metrics["num_heads"] == 2 and metrics["chosen_n_blocks"] == 0
    assert metrics["steps"] == 5 * 20 and metrics["batch_size"] == 32
    assert {k for k in metrics if k.startswith("val_top1/")} == {
        "val_top1/pooled,lr=0.001",
        "val_top1/pooled,lr=0.1",
    }
    assert correct.shape == (90,) and metrics["top1"] == pytest.approx(correct.mean())
    # Recompute the chosen head independently of the driver: train the same grid, take its logits.
    variants = make_variants("pooled", 6, MultiHeadConfig(**cfg))
    fit, _ = stratified_holdout(y, 0.2, 0)
    lrs = [b * 32 / 256 for b in cfg["base_lrs"]]
    params = train_heads(
        init_heads(variants, 2, 3, init_std=0.01, seed=0),
        x[fit],
        y[fit],
        variants,
        lrs,
        batch_size=32,
        steps=100,
        momentum=0.9,
        seed=0,
        mesh=parallel.make_mesh(),
    )
    k = cfg["base_lrs"].index(metrics["chosen_base_lr"])
    logits = tx @ np.asarray(params[0]["w"][k]) + np.asarray(params[0]["b"][k])
    want = calibration_metrics(logits, ty)
    for name in ("top1", "nll", "ece"):
        assert metrics[name] == pytest.approx(want[name], abs=1e-5)
    with pytest.raises(ValueError, match="multilabel_probe"):
        task.run(
            Features(x, np.eye(3)[y], "k"),
            Features(tx, ty, "k"),
            num_classes=3,
            cfg=cfg,
            mesh=parallel.make_mesh(),
            workdir=None,
            progress=False,
        )


def test_battle_config_sections():
    """The "bob" protocol runs DINOv2's recipe (the dataclass defaults); "local" is shorter."""
    from bob_jax.config_lib import battle_config

    bob = battle_config(backbones=(), protocol="bob").linear_multihead
    assert MultiHeadConfig(**bob.to_dict()) == MultiHeadConfig()
    local = MultiHeadConfig(**battle_config(backbones=(), protocol="local").linear_multihead.to_dict())
    assert local.epochs * local.epoch_length < 12500 and local.base_lrs == MultiHeadConfig().base_lrs
