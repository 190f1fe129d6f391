"""Tests for bob_jax.evaluate.retrieval: hand cases, scikit-learn AP, the revisited Oxford/Paris protocol."""

import logging

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from bob_jax.evaluate import retrieval as R


def _one_query(scores, rel, ks=(1, 5, 10)):
    out = R.metrics_from_scores(np.asarray([scores], float), np.asarray([rel], bool), ks=ks)
    return {k: v[0] for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- hand cases


def test_single_positive_at_rank_two():
    m = _one_query([0.9, 0.8, 0.1], [False, True, False])
    assert m["AP"] == pytest.approx(0.5)  # step rule: precision 1/2 at the only positive
    assert m["AP_revisited"] == pytest.approx(0.25)  # trapezoid: (0 + 1/2) / 2
    assert R.average_precision_trapezoid(np.array([1]), 1) == pytest.approx(0.25)
    assert m["RR"] == pytest.approx(0.5)
    assert m["P@1"] == 0.0  # k_q = min(2, 1) = 1, no hit in the top 1
    assert m["P@5"] == pytest.approx(0.5)  # k_q = min(2, 5) = 2: 1 hit / 2
    assert m["R@1"] == 0.0 and m["R@5"] == 1.0


def test_two_positives_hand_computed():
    # relevance by rank: 1 0 1 0 0
    m = _one_query([5, 4, 3, 2, 1], [1, 0, 1, 0, 0])
    assert m["AP"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    trap = ((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2) / 2  # positives at r=0 (j=0) and r=2 (j=1)
    assert m["AP_revisited"] == pytest.approx(trap)
    assert m["RR"] == 1.0
    assert m["P@1"] == 1.0
    assert m["P@5"] == pytest.approx(2 / 3)  # k_q = min(last positive rank 3, 5) = 3
    assert m["P@10"] == pytest.approx(2 / 3)
    assert m["R@1"] == pytest.approx(0.5) and m["R@5"] == 1.0


def test_ties_stable_order_and_sklearn_grouping():
    # Both database items tie; the stable sort keeps index order, so the positive sits at rank 2.
    m = _one_query([0.3, 0.3], [False, True])
    assert m["AP_revisited"] == pytest.approx(0.25)
    assert m["RR"] == pytest.approx(0.5)
    # scikit-learn admits the whole tie group at one threshold: precision 1/2.
    assert m["AP"] == pytest.approx(0.5) == average_precision_score([0, 1], [0.3, 0.3])
    # Tie order is by database index: the positive first gives revisited AP 1.
    assert _one_query([0.3, 0.3], [True, False])["AP_revisited"] == pytest.approx(1.0)


def test_no_positive_query_is_nan_and_mrr_zero():
    m = _one_query([0.5, 0.2], [False, False])
    assert np.isnan(m["AP"]) and np.isnan(m["AP_revisited"]) and np.isnan(m["P@1"]) and np.isnan(m["R@1"])
    assert m["RR"] == 0.0 and m["num_positives"] == 0


def test_retrieval_metrics_hand_made_descriptors(caplog):
    # 2-D descriptors with known angles; db labels 0,1,0; query 0 -> order db1, db0, db2 by cosine.
    db = np.array([[1.0, 0.2], [1.0, 0.0], [0.0, 1.0]])
    db_labels = np.array([0, 1, 0])
    q = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    q_labels = np.array([0, 0, 7])  # label 7 has no positive: skipped in means, counts in MRR
    with caplog.at_level(logging.WARNING):
        m = R.retrieval_metrics(q, db, q_labels, db_labels, ks=(1, 2))
    assert "1 of 3 queries have no positive" in caplog.text
    # query 0: ranking db1(neg), db0(pos), db2(pos) -> rel 0 1 1
    ap0 = (1 / 2 + 2 / 3) / 2
    trap0 = ((0 + 1 / 2) / 2 + (1 / 2 + 2 / 3) / 2) / 2
    # query 1: ranking db2(pos), db0(pos), db1(neg) -> rel 1 1 0
    assert m["mAP"] == pytest.approx((ap0 + 1.0) / 2)
    assert m["mAP_revisited"] == pytest.approx((trap0 + 1.0) / 2)
    assert m["MRR"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert m["P@1"] == pytest.approx((0 + 1) / 2)
    assert m["P@2"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["R@1"] == pytest.approx((0 + 1 / 2) / 2)
    assert m["R@2"] == pytest.approx((1 / 2 + 1) / 2)
    assert list(m) == ["mAP", "mAP_revisited", "MRR", "P@1", "P@2", "R@1", "R@2"]


# ------------------------------------------------------------------------------------ random / independent


def _reference_per_query(scores, rel, ks):
    """Straightforward per-query loops, written independently of the vectorised code."""
    out = {"AP": [], "trap": [], "RR": [], **{f"P@{k}": [] for k in ks}, **{f"R@{k}": [] for k in ks}}
    for s, r in zip(scores, rel, strict=True):
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))
        rr = [bool(r[i]) for i in order]
        npos = sum(rr)
        if npos == 0:
            out["RR"].append(0.0)
            continue
        out["AP"].append(average_precision_score(r.astype(int), s))
        positions = [i for i, x in enumerate(rr) if x]
        ap = 0.0
        for j, p in enumerate(positions):
            prec0 = 1.0 if p == 0 else j / p
            ap += (prec0 + (j + 1) / (p + 1)) / 2 / npos
        out["trap"].append(ap)
        out["RR"].append(1 / (positions[0] + 1))
        for k in ks:
            kq = min(positions[-1] + 1, k)
            out[f"P@{k}"].append(sum(rr[:kq]) / kq)
            out[f"R@{k}"].append(sum(rr[:k]) / npos)
    return out


def test_random_descriptors_match_sklearn_and_loops():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(40, 16))
    db = rng.normal(size=(120, 16))
    q_labels = rng.integers(0, 9, size=40)  # label 8 never occurs in the database
    db_labels = rng.integers(0, 8, size=120)
    ks = (1, 5, 10, 200)  # k beyond the database size is fine
    m = R.retrieval_metrics(q, db, q_labels, db_labels, ks=ks, chunk_size=7)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    dn = db / np.linalg.norm(db, axis=1, keepdims=True)
    ref = _reference_per_query(qn @ dn.T, q_labels[:, None] == db_labels[None, :], ks)
    assert (q_labels == 8).any()
    assert m["mAP"] == pytest.approx(np.mean(ref["AP"]), abs=1e-12)
    assert m["mAP_revisited"] == pytest.approx(np.mean(ref["trap"]), abs=1e-12)
    assert m["MRR"] == pytest.approx(np.sum(ref["RR"]) / 40, abs=1e-12)
    for k in ks:
        assert m[f"P@{k}"] == pytest.approx(np.mean(ref[f"P@{k}"]), abs=1e-12)
        assert m[f"R@{k}"] == pytest.approx(np.mean(ref[f"R@{k}"]), abs=1e-12)
    # chunking does not change anything
    m_all = R.retrieval_metrics(q, db, q_labels, db_labels, ks=ks, chunk_size=1000)
    assert m_all == pytest.approx(m, abs=1e-15)
    # descriptor scale is irrelevant (L2-normalised)
    assert R.retrieval_metrics(3 * q, 0.5 * db, q_labels, db_labels, ks=ks) == pytest.approx(m, abs=1e-12)


def test_sklearn_ap_with_many_ties():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, size=(30, 25)).astype(float)  # heavy ties
    rel = rng.random((30, 25)) < 0.3
    rel[0] = False
    out = R.metrics_from_scores(scores, rel, ks=(3,))
    ref = _reference_per_query(scores, rel, (3,))
    valid = rel.any(axis=1)
    np.testing.assert_allclose(out["AP"][valid], ref["AP"], atol=1e-12)
    np.testing.assert_allclose(out["AP_revisited"][valid], ref["trap"], atol=1e-12)
    np.testing.assert_allclose(out["P@3"][valid], ref["P@3"], atol=1e-12)
    np.testing.assert_allclose(out["RR"], ref["RR"], atol=1e-12)
    for i in np.flatnonzero(valid):
        assert out["AP"][i] == pytest.approx(
            average_precision_score(rel[i].astype(int), scores[i]), abs=1e-12
        )


def test_rank_database_stable_ties():
    q = np.array([[1.0, 0.0]])
    db = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [0.0, 5.0]])
    np.testing.assert_array_equal(R.rank_database(q, db), [[1, 2, 0, 3]])


def test_errors():
    with pytest.raises(ValueError, match="dim"):
        R.retrieval_metrics(np.ones((2, 3)), np.ones((4, 5)), np.zeros(2), np.zeros(4))
    with pytest.raises(ValueError, match="none of the 2 queries"):
        R.retrieval_metrics(np.eye(2), np.eye(2), np.array([5, 6]), np.array([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        R.retrieval_metrics(np.eye(2), np.eye(2), np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        R.retrieval_metrics(np.array([[np.nan, 1.0]]), np.eye(2), np.zeros(1), np.zeros(2))
    with pytest.raises(ValueError, match="ks"):
        R.retrieval_metrics(np.eye(2), np.eye(2), np.zeros(2), np.zeros(2), ks=(0,))


# -------------------------------------------------------------------------------------- revisited protocol


def test_revisited_map_with_junk_hand_computed():
    ranks = np.array(
        [
            [3, 5, 0, 1, 2, 4, 6, 7],  # ok at positions 2 and 4, junk (5) at position 1
            [0, 1, 2, 3, 4, 5, 6, 7],  # no positives: skipped (but counted in MRR's denominator)
            [7, 0, 1, 2, 3, 4, 5, 6],  # single positive first
        ]
    )
    gnd = [{"ok": [0, 2], "junk": [5]}, {"ok": [], "junk": [1]}, {"ok": [7]}]
    per_q = R.revisited_per_query(ranks, gnd, (1, 5))
    # after junk removal the positives of query 0 sit at 0-based positions 1 and 3
    ap0 = ((0 + 1 / 2) / 2 + (1 / 3 + 2 / 4) / 2) / 2
    assert per_q["AP"][0] == pytest.approx(ap0)
    assert per_q["RR"][0] == pytest.approx(1 / 3)  # before junk removal: first positive at position 2
    assert per_q["P@1"][0] == 0.0 and per_q["P@5"][0] == pytest.approx(2 / 4)  # k_q = min(4, 5)
    assert per_q["R@1"][0] == 0.0 and per_q["R@5"][0] == 1.0
    assert np.isnan(per_q["AP"][1])
    m = R.revisited_map(ranks, gnd, kappas=(1, 5))
    assert m["mAP"] == pytest.approx((ap0 + 1.0) / 2)
    assert m["MRR"] == pytest.approx((1 / 3 + 0 + 1) / 3)
    assert m["P@1"] == pytest.approx(0.5) and m["P@5"] == pytest.approx((0.5 + 1) / 2)
    assert m["R@1"] == pytest.approx(0.5) and m["R@5"] == pytest.approx(1.0)
    # junk that would otherwise be a negative: without removal AP drops
    no_junk = R.revisited_map(ranks[:1], [{"ok": [0, 2]}], kappas=(1,))
    assert no_junk["mAP"] < ap0


def test_revisited_truncated_ranking_missing_positive():
    # one positive ranked, the other absent from the (truncated) ranking: nres still counts both
    m = R.revisited_map(np.array([[4, 9]]), [{"ok": [4, 8], "junk": []}], kappas=(1,))
    assert m["mAP"] == pytest.approx(0.5)
    assert m["R@1"] == pytest.approx(0.5)
    m0 = R.revisited_map(np.array([[1, 9], [4, 0]]), [{"ok": [4]}, {"ok": [4]}], kappas=(1,))
    assert m0["mAP"] == pytest.approx(0.5)  # first query retrieves nothing: AP 0


def test_revisited_ground_truth_and_difficulties():
    gnd = [
        {"easy": [0], "hard": [1], "junk": [2], "bbx": [0, 0, 1, 1]},
        {"easy": [3], "hard": [], "junk": []},
    ]
    e = R.revisited_ground_truth(gnd, "easy")
    mdm = R.revisited_ground_truth(gnd, "medium")
    h = R.revisited_ground_truth(gnd, "hard")
    assert sorted(e[0]["ok"]) == [0] and sorted(e[0]["junk"]) == [1, 2]
    assert sorted(mdm[0]["ok"]) == [0, 1] and sorted(mdm[0]["junk"]) == [2]
    assert sorted(h[0]["ok"]) == [1] and sorted(h[0]["junk"]) == [0, 2]
    assert h[1]["ok"].size == 0  # no hard positives: skipped under Hard
    ranks = np.array([[2, 1, 0, 3], [3, 0, 1, 2]])
    res = R.revisited_evaluate(ranks, gnd, kappas=(1,))
    # easy: q0 ranking minus junk {2,1} -> [0, 3]: AP 1; q1: 3 first: AP 1
    assert res["easy"]["mAP"] == pytest.approx(1.0)
    # medium: q0 minus junk {2} -> [1, 0, 3]: both positives on top: AP 1
    assert res["medium"]["mAP"] == pytest.approx(1.0)
    # hard: only q0 counts; minus junk {0, 2} -> [1, 3]: AP 1; MRR divides by both queries
    assert res["hard"]["mAP"] == pytest.approx(1.0)
    assert res["hard"]["MRR"] == pytest.approx((1 / 2 + 0) / 2)
    with pytest.raises(ValueError, match="difficulty"):
        R.revisited_ground_truth(gnd, "extreme")
    with pytest.raises(ValueError, match="lacks"):
        R.revisited_ground_truth([{"easy": [0]}], "easy")


def test_revisited_without_junk_agrees_with_label_metrics():
    rng = np.random.default_rng(2)
    q, db = rng.normal(size=(12, 8)), rng.normal(size=(50, 8))
    ql, dl = rng.integers(0, 4, 12), rng.integers(0, 4, 50)
    ranks = R.rank_database(q, db)
    gnd = [{"ok": np.flatnonzero(dl == c), "junk": []} for c in ql]
    a = R.revisited_map(ranks, gnd, kappas=(1, 5))
    b = R.retrieval_metrics(q, db, ql, dl, ks=(1, 5))
    assert a["mAP"] == pytest.approx(b["mAP_revisited"], abs=1e-12)
    for key in ("MRR", "P@1", "P@5", "R@1", "R@5"):
        assert a[key] == pytest.approx(b[key], abs=1e-12)


def test_revisited_layout_error_mentions_transpose():
    with pytest.raises(ValueError, match="ranks.T"):
        R.revisited_map(np.zeros((5, 2), dtype=int), [{"ok": [0]}, {"ok": [1]}])


# --------------------------------------------------------------------------------------- class-folder split


def test_class_folder_split():
    names = [
        "b3.jpg",
        "a1.jpg",
        "a2.jpg",
        "b1.jpg",
        "a3.jpg",
        "b2.jpg",
        "a4.jpg",
        "a5.jpg",
        "c1.jpg",
        "a0.jpg",
        "b0.jpg",
    ]
    labels = np.array([1, 0, 0, 1, 0, 1, 0, 0, 2, 0, 1])
    qi, di = R.class_folder_split(names, labels, 0.2)
    # BoB's int(0.2 * n): class 0, a0..a5 (6 items) -> 1 query (a0); class 1 (4 items) and class 2 (1 item)
    # -> no query, their items stay in the database.
    assert [names[i] for i in qi] == ["a0.jpg"]
    assert [names[i] for i in di] == [
        "a1.jpg",
        "a2.jpg",
        "a3.jpg",
        "a4.jpg",
        "a5.jpg",
        "b0.jpg",
        "b1.jpg",
        "b2.jpg",
        "b3.jpg",
        "c1.jpg",
    ]
    qi, di = R.class_folder_split(names, labels, 0.5, max_per_class=4)
    assert [names[i] for i in qi] == ["a0.jpg", "a1.jpg", "b0.jpg", "b1.jpg"]
    assert [names[i] for i in di] == ["a2.jpg", "a3.jpg", "b2.jpg", "b3.jpg", "c1.jpg"]
    with pytest.raises(ValueError, match="query_fraction"):
        R.class_folder_split(names, labels, 1.0)
    with pytest.raises(ValueError, match="one label per name"):
        R.class_folder_split(names[:3], labels, 0.2)
