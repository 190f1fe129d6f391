"""CheXpert multi-label: uncertainty policy, parsing, AUROC against scikit-learn, single-class labels."""

import csv
import io
import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bob_jax.evaluate.multilabel import (
    CHEXPERT_CSV_OBSERVATIONS,
    CHEXPERT_LABELS,
    auroc,
    chexpert_targets,
    chexpert_targets_from_csv_rows,
    chexpert_targets_from_tfds,
    mean_auroc,
)

NAN = np.nan


def test_uncertainty_policy_per_label():
    # Columns: Cardiomegaly, Edema, Consolidation, Atelectasis, Pleural Effusion
    raw = np.array(
        [
            [-1, -1, -1, -1, -1],
            [1, 0, 1, 0, 1],
            [NAN, NAN, NAN, NAN, NAN],
            [0, 1, -1, NAN, 1],
        ]
    )
    want = np.array(
        [
            [0, 1, 0, 1, 0],  # U-Zeros, U-Ones, U-Zeros, U-Ones, U-Zeros
            [1, 0, 1, 0, 1],
            [0, 0, 0, 0, 0],  # blanks -> 0
            [0, 1, 0, 0, 1],
        ],
        np.float32,
    )
    got = chexpert_targets(raw)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="must be 1, 0, -1"):
        chexpert_targets(np.full((1, 5), 2.0))
    with pytest.raises(ValueError, match="no uncertainty policy"):
        chexpert_targets(np.zeros((1, 1)), ["Fracture"])


def test_csv_rows_and_tfds_ids_agree():
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_CSV_OBSERVATIONS)
    lines = [
        "p1,Male,60,Frontal,AP,1.0,,-1.0,,,-1.0,1.0,,0.0,,-1.0,,,1.0",
        "p2,Female,40,Frontal,PA,,,1.0,1.0,,,-1.0,,-1.0,,1.0,,,",
    ]
    rows = list(csv.DictReader(io.StringIO("\n".join([header, *lines]))))
    got = chexpert_targets_from_csv_rows(rows)
    # p1: Cardiomegaly -1 -> 0, Edema -1 -> 1, Consolidation 1, Atelectasis 0, Effusion -1 -> 0
    # p2: Cardiomegaly 1, Edema blank -> 0, Consolidation -1 -> 0, Atelectasis -1 -> 1, Effusion 1
    np.testing.assert_array_equal(got, [[0, 1, 1, 0, 0], [1, 0, 0, 1, 1]])
    # The same rows as tfds `chexpert` stores them (ids: 0 uncertain, 1 positive, 2 negative, 3 blank).
    to_id = {"-1.0": 0, "1.0": 1, "0.0": 2, "": 3}
    ids = np.array([[to_id[r[c]] for c in CHEXPERT_CSV_OBSERVATIONS] for r in rows])
    np.testing.assert_array_equal(chexpert_targets_from_tfds(ids), got)
    with pytest.raises(ValueError, match="no column"):
        chexpert_targets_from_csv_rows([{"Edema": "1.0"}])


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(5):
        y = rng.integers(0, 2, size=200)
        s = rng.normal(size=200) + y * 0.8
        if trial % 2:
            s = np.round(s, 1)  # many ties
        assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auroc([0.1, 0.9], [0, 1]) == 1.0
    assert auroc([0.5, 0.5], [0, 1]) == 0.5
    assert auroc([0.9, 0.1], [0, 1]) == 0.0


def test_mean_auroc_matches_sklearn():
    rng = np.random.default_rng(1)
    targets = (rng.random((300, 5)) < 0.3).astype(np.float32)
    logits = rng.normal(size=(300, 5)) + 1.5 * targets
    out = mean_auroc(logits, targets)
    want = [roc_auc_score(targets[:, j], logits[:, j]) for j in range(5)]
    assert out["mean_auroc"] == pytest.approx(np.mean(want), abs=1e-12)
    assert list(out["per_label"]) == list(CHEXPERT_LABELS)
    for j, name in enumerate(CHEXPERT_LABELS):
        assert out["per_label"][name] == pytest.approx(want[j], abs=1e-12)
    assert out["skipped"] == [] and out["num_eval"] == 300
    # Sigmoid probabilities rank the same (the original scores sigmoid outputs).
    probs = 1 / (1 + np.exp(-logits))
    assert mean_auroc(probs, targets)["mean_auroc"] == pytest.approx(out["mean_auroc"], abs=1e-12)
    # Padded rows are ignored through `valid`.
    padded = mean_auroc(
        np.r_[logits, np.zeros((4, 5))], np.r_[targets, np.ones((4, 5))], valid=np.arange(304) < 300
    )
    assert padded["mean_auroc"] == pytest.approx(out["mean_auroc"])


def test_single_class_label_is_skipped_with_warning():
    rng = np.random.default_rng(2)
    targets = (rng.random((50, 5)) < 0.5).astype(np.float32)
    targets[:, 2] = 0.0  # no Consolidation positives in this evaluation set
    scores = rng.normal(size=(50, 5))
    # sklearn has no value for it: older releases (the original's) raise, recent ones warn and give NaN.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            assert np.isnan(roc_auc_score(targets[:, 2], scores[:, 2]))
        except ValueError:
            pass
    with pytest.warns(RuntimeWarning, match="Consolidation"):
        out = mean_auroc(scores, targets)
    assert out["skipped"] == ["Consolidation"] and out["per_label"]["Consolidation"] is None
    assert out["num_labels_scored"] == 4 and len(out["warnings"]) == 1
    want = np.mean([roc_auc_score(targets[:, j], scores[:, j]) for j in (0, 1, 3, 4)])
    assert out["mean_auroc"] == pytest.approx(want, abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no label has both classes"):
            mean_auroc(scores, np.zeros_like(targets))


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        mean_auroc(np.zeros((3, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="0/1"):
        mean_auroc(np.zeros((2, 5)), np.full((2, 5), -1.0))
