"""ImageNet-A/R 200-class masking: package data lists and masked top-k on synthetic logits."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from bob_jax.data.imagenet_ood_classes import OOD_CLASS_LISTS, to_masked_labels, valid_class_indices
from bob_jax.evaluate.ood import masked_logits, masked_top1, masked_topk_accuracy

LISTS = Path(__file__).resolve().parents[2] / "bob_jax" / "data" / "lists"


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r"])
def test_class_lists_are_the_original_files(name):
    idx = valid_class_indices(name)
    raw = (LISTS / OOD_CLASS_LISTS[name][0]).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == OOD_CLASS_LISTS[name][1]
    assert idx.shape == (200,) and idx.dtype == np.int64
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 1000
    assert idx.tolist() == [int(t) for t in raw.split()]


def test_known_entries():
    a, r = valid_class_indices("imagenet_a"), valid_class_indices("ImageNet-R")
    assert a[:5].tolist() == [6, 11, 13, 15, 17] and a[-1] == 988
    assert r[:5].tolist() == [1, 2, 4, 6, 8] and r[-1] == 988
    with pytest.raises(ValueError, match="no 200-class list"):
        valid_class_indices("imagenet_sketch")


def _reference_top1(logits, labels200, idx):
    # The original: boolean mask over the 1000 logits, then argmax.
    bool_mask = np.array([i in set(idx.tolist()) for i in range(logits.shape[1])])
    return float(np.mean(np.argmax(logits[:, bool_mask], axis=1) == labels200))


def test_masked_top1_matches_boolean_mask_reference():
    rng = np.random.default_rng(0)
    idx = valid_class_indices("imagenet_a")
    logits = rng.normal(size=(64, 1000)).astype(np.float32)
    labels = rng.integers(0, 200, size=64)
    # Make half the examples correct in the 200-space and put a larger logit outside the mask, which
    # a plain 1000-way argmax would pick.
    outside = np.setdiff1d(np.arange(1000), idx)[0]
    logits[np.arange(32), idx[labels[:32]]] = 10.0
    logits[:, outside] = 50.0
    got = masked_top1(logits, labels, idx)
    assert got == pytest.approx(_reference_top1(logits, labels, idx))
    assert got >= 0.5
    assert np.mean(np.argmax(logits, 1) == idx[labels]) == 0.0  # unmasked argmax never right here


def test_hand_case_and_topk():
    idx = np.array([1, 3, 4])
    logits = np.array(
        [
            [9.0, 0.1, 5.0, 0.3, 0.2],  # masked [0.1, 0.3, 0.2] -> class 1 (index 3)
            [0.0, 2.0, 9.0, 1.0, 3.0],  # masked [2, 1, 3] -> class 2
            [0.0, 1.0, 0.0, 1.0, 0.0],  # tie between classes 0 and 1 -> 0 (first)
        ]
    )
    labels = np.array([1, 0, 0])
    assert masked_top1(logits, labels, idx) == pytest.approx(2 / 3)
    assert masked_topk_accuracy(logits, labels, idx, k=2) == pytest.approx(1.0)
    assert masked_top1(logits, labels, idx, valid=np.array([True, False, True])) == 1.0
    np.testing.assert_array_equal(masked_logits(logits, idx), logits[:, [1, 3, 4]])


def test_topk_matches_argsort():
    rng = np.random.default_rng(1)
    idx = valid_class_indices("imagenet_r")
    logits = rng.normal(size=(50, 1000))
    labels = rng.integers(0, 200, size=50)
    logits[np.arange(25), idx[labels[:25]]] += 2.5
    top5 = np.argsort(-logits[:, idx], axis=1, kind="stable")[:, :5]
    want = np.mean(np.any(top5 == labels[:, None], axis=1))
    assert masked_topk_accuracy(logits, labels, idx, k=5) == pytest.approx(want)


def test_masked_logits_in_jax():
    import jax
    import jax.numpy as jnp

    idx = valid_class_indices("imagenet_a")
    logits = jnp.arange(2000.0).reshape(2, 1000)
    out = jax.jit(lambda x: masked_logits(x, idx))(logits)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(logits)[:, idx])


def test_to_masked_labels_and_errors():
    idx = valid_class_indices("imagenet_a")
    np.testing.assert_array_equal(to_masked_labels(idx[[5, 0, 199]], idx), [5, 0, 199])
    with pytest.raises(ValueError, match="not among"):
        to_masked_labels(np.array([0]), idx)  # class 0 is not in ImageNet-A
    logits = np.zeros((2, 1000))
    with pytest.raises(ValueError, match="to_masked_labels"):
        masked_top1(logits, np.array([6, 988]), idx)  # 1000-space labels
    with pytest.raises(ValueError, match="ascending"):
        masked_top1(logits, np.array([0, 1]), idx[::-1])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        masked_top1(np.zeros((2, 10)), np.array([0, 1]), idx)
