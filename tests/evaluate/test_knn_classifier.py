"""Tests for bob_jax.evaluate.knn: hand case, numpy brute force, scikit-learn agreement for huge T."""

import numpy as np
import pytest

from bob_jax.evaluate import knn


def _numpy_knn(train, train_labels, test, num_classes, k, temperature):
    """Independent brute force: full similarity matrix, full argsort, exp(sim / T) votes."""
    tr = train / np.linalg.norm(train, axis=1, keepdims=True)
    te = test / np.linalg.norm(test, axis=1, keepdims=True)
    sim = te.astype(np.float64) @ tr.T.astype(np.float64)
    k = min(k, len(train))
    preds = []
    for row in sim:
        nn = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for i in nn:
            votes[train_labels[i]] += np.exp(row[i] / temperature)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


# Train points on the unit circle; the test point (1, 0) has similarities 1, 0.8, 0.6, 0.
HAND_TRAIN = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]], np.float32)
HAND_LABELS = np.array([1, 0, 0, 2])
HAND_TEST = np.array([[3.0, 0.0]], np.float32)


@pytest.mark.parametrize(
    "k, temperature, expected",
    [
        (1, 0.07, 1),  # nearest neighbour only
        (3, 0.07, 1),  # e^(1/.07) = 1.6e6 beats e^(.8/.07) + e^(.6/.07) = 9.2e4 + 5.3e3
        (3, 10.0, 0),  # e^0.1 = 1.105 loses to e^0.08 + e^0.06 = 2.145
        (100, 1e6, 0),  # k clipped to 4, nearly uniform: two votes for class 0
    ],
)
def test_hand_case(k, temperature, expected):
    pred = knn.knn_classify(HAND_TRAIN, HAND_LABELS, HAND_TEST, num_classes=3, k=k, temperature=temperature)
    assert pred.tolist() == [expected]


def test_matches_numpy_brute_force_with_chunking():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, 12))
    train_labels = rng.integers(0, 6, size=97)
    test_labels = rng.integers(0, 6, size=37)
    train = (centers[train_labels] + 1.2 * rng.normal(size=(97, 12))).astype(np.float32)
    test = (centers[test_labels] + 1.2 * rng.normal(size=(37, 12))).astype(np.float32)
    ks = (1, 5, 20, 500)
    multi = knn.knn_classify_multi(
        train, train_labels, test, num_classes=6, ks=ks, temperature=0.07, chunk_size=16, train_chunk_size=13
    )  # ragged test and train blocks
    for k in ks:
        np.testing.assert_array_equal(multi[k], _numpy_knn(train, train_labels, test, 6, k, 0.07))
    single = knn.knn_classify(train, train_labels, test, num_classes=6, k=20)
    np.testing.assert_array_equal(single, multi[20])
    acc = knn.knn_accuracy(train, train_labels, test, test_labels, num_classes=6, k=20)
    assert acc == pytest.approx(np.mean(multi[20] == test_labels))
    assert acc > 0.5  # well-separated clusters


def test_agrees_with_sklearn_uniform_weights_for_huge_temperature():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(1)
    train = rng.normal(size=(80, 5)).astype(np.float32)
    train_labels = (train[:, 0] + 0.5 * rng.normal(size=80) > 0).astype(int)
    test = rng.normal(size=(40, 5)).astype(np.float32)
    # Two classes and odd k: no vote ties, so a near-uniform weighting equals the majority vote.
    clf = KNeighborsClassifier(n_neighbors=5, metric="cosine", weights="uniform", algorithm="brute")
    clf.fit(train, train_labels)
    ours = knn.knn_classify(train, train_labels, test, num_classes=2, k=5, temperature=1e6)
    np.testing.assert_array_equal(ours, clf.predict(test))


def test_small_temperature_does_not_overflow():
    pred = knn.knn_classify(HAND_TRAIN, HAND_LABELS, HAND_TEST, num_classes=3, k=3, temperature=1e-4)
    assert pred.tolist() == [1]


def test_errors():
    with pytest.raises(ValueError, match="num_classes"):
        knn.knn_classify(HAND_TRAIN, HAND_LABELS, HAND_TEST, num_classes=2)
    with pytest.raises(ValueError, match="integers"):
        knn.knn_classify(HAND_TRAIN, HAND_LABELS.astype(float), HAND_TEST, num_classes=3)
    with pytest.raises(ValueError, match="test_feats"):
        knn.knn_classify(HAND_TRAIN, HAND_LABELS, np.ones((2, 3)), num_classes=3)
    with pytest.raises(ValueError, match="temperature"):
        knn.knn_classify(HAND_TRAIN, HAND_LABELS, HAND_TEST, num_classes=3, temperature=0.0)
    with pytest.raises(ValueError, match="test_labels"):
        knn.knn_accuracy(HAND_TRAIN, HAND_LABELS, HAND_TEST, np.zeros(3), num_classes=3)
