"""Multi-label linear probe: learns a separable multi-label problem (AUROC near 1), per-label AUROC equals
sklearn's roc_auc_score on the probe's logits, the task entry, input errors, and multi-label targets kept
by feature extraction."""

import warnings

import numpy as np
import optax
import pytest
from sklearn.metrics import roc_auc_score

from bob_jax import backbones, parallel
from bob_jax.features import Features, extract_features
from bob_jax.frozen import TASKS, DataSplits
from bob_jax.tasks.multilabel_probe import (
    MultilabelProbeConfig,
    make_optimizer,
    run_multilabel_probe,
    standardizer,
)

FAST = MultilabelProbeConfig(epochs=15, warmup_epochs=2, batch_size=64, lr=5e-2)


def separable(n, seed, dim=12, labels=4):
    """Targets are signs of fixed linear functions of the features (offset and scaled per dimension, so
    standardisation has work to do)."""
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((dim, labels)), rng.standard_normal(labels) * 0.3
    scale = rng.uniform(0.1, 20.0, dim)
    z = np.random.default_rng(seed).standard_normal((n, dim))
    return (z * scale + 5.0).astype(np.float32), (z @ w + b > 0).astype(np.float32)


def test_separable_problem_auroc_near_one_and_equal_to_sklearn():
    x, y = separable(512, seed=1)
    tx, ty = separable(256, seed=2)
    names = ("a", "b", "c", "d")
    metrics, logits = run_multilabel_probe(x, y, tx, ty, config=FAST, mesh=parallel.make_mesh(), names=names)
    want = [roc_auc_score(ty[:, j], logits[:, j]) for j in range(4)]
    for name, value in zip(names, want, strict=True):
        assert metrics[f"auroc/{name}"] == pytest.approx(value, abs=1e-12)
    assert metrics["mean_auroc"] == pytest.approx(np.mean(want), abs=1e-12)
    assert metrics["mean_auroc"] > 0.99 and metrics["num_labels_scored"] == 4
    bce = optax.sigmoid_binary_cross_entropy(logits, ty).mean()
    assert metrics["test_bce"] == pytest.approx(float(bce), rel=1e-5) and metrics["test_bce"] < 0.25
    assert metrics["steps"] == 15 * (512 // 64) and metrics["batch_size"] == 64


def test_task_entry_label_names_and_skipped_label():
    x, y = separable(256, seed=3)
    tx, ty = separable(128, seed=4)
    ty[:, 2] = 0.0  # one class only: AUROC undefined, left out of the mean with a warning

    class Source:
        class_names = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis")

    cfg = dict(
        epochs=5,
        warmup_epochs=1,
        batch_size=64,
        lr=1e-2,
        min_lr=1e-5,
        weight_decay=1e-3,
        standardize=True,
        init_std=0.01,
        seed=0,
    )
    task = TASKS["multilabel_probe"]
    assert task.primary_metric == "mean_auroc"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics, per_example = task.run(
            Features(x, y, "k"),
            Features(tx, ty, "k"),
            num_classes=4,
            cfg=cfg,
            mesh=parallel.make_mesh(),
            workdir=None,
            progress=False,
            sources=DataSplits(Source(), Source()),
        )
    assert per_example is None
    assert any("Consolidation" in str(w.message) for w in caught)
    assert "auroc/Consolidation" not in metrics and metrics["num_labels_skipped"] == 1
    scored = [metrics[f"auroc/{n}"] for n in ("Cardiomegaly", "Edema", "Atelectasis")]
    assert metrics["mean_auroc"] == pytest.approx(np.mean(scored))
    assert all(isinstance(v, float) for v in metrics.values())  # results store: name -> number


def test_bad_inputs_name_the_fix():
    x, y = separable(64, seed=5)
    with pytest.raises(ValueError, match="linear_probe"):
        run_multilabel_probe(x, y.argmax(1), x, y, config=FAST)
    with pytest.raises(ValueError, match="0/1"):
        run_multilabel_probe(x, y - 1.0, x, y, config=FAST)  # raw CheXpert values (-1 uncertain)


def test_standardizer_and_weight_decay_on_weights_only():
    x = np.random.default_rng(0).standard_normal((1000, 5)).astype(np.float32) * 3 + 7
    x[:, 4] = 2.0  # constant dimension
    mean, scale = standardizer(x, True, chunk=128)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(scale[:4], x[:, :4].std(0), rtol=1e-4)
    assert scale[4] == 1.0
    tx = make_optimizer(MultilabelProbeConfig(epochs=1, warmup_epochs=0, lr=0.1, weight_decay=0.5), 10)
    params = {"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)}
    zero = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * params["w"])  # decoupled: lr * wd * w
    np.testing.assert_array_equal(updates["b"], 0.0)


def test_extraction_keeps_multilabel_targets():
    targets = (np.arange(6 * 3).reshape(6, 3) % 2).astype(np.float32)

    class MultiLabelSource:
        multilabel = True

        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"image": np.full((32, 32, 3), 40 * i, np.uint8), "label": targets[i]}

        def describe(self):
            return {"name": "multilabel6"}

    model = backbones.create(
        "vit_small_patch16_224.augreg_in1k",
        weights=None,
        img_size=32,
        depth=1,
        embed_dim=16,
        num_heads=2,
        num_classes=0,
    )
    feats = extract_features(
        model,
        MultiLabelSource(),
        preprocess=model.preprocess.replace(input_size=32),
        batch_size=4,
        progress=False,
    )  # 6 = 4 + 2: the padded last batch is dropped
    assert feats.labels.dtype == np.float32 and feats.labels.shape == (6, 3)
    np.testing.assert_array_equal(feats.labels, targets)
    assert feats.features.shape == (6, 16)
