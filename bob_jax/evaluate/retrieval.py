"""Training-free image-retrieval metrics (numpy), as the Battle of the Backbones retrieval suite reports them.

Sources whose semantics are reproduced here (read, not copied):

* ``hsouri/bob-retrieval`` ``retrieval/utils.py`` (``compute_ap`` / ``compute_map``): BoB's numbers. Its AP is
  the revisited Oxford/Paris trapezoidal rule, it adds recall@k and MRR to revisitop's ``compute_map``, and it
  ranks with ``torch.argsort(-sim, dim=0)`` on L2-normalised descriptors.
* ``filipradenovic/revisitop`` ``python/evaluate.py`` and ``python/example_evaluate.py``: the revisited
  Oxford/Paris protocol (junk removed from the ranking; Easy / Medium / Hard ground truth; mAP and mP@k;
  queries without positives are left out of the means).
* scikit-learn ``average_precision_score``: the "standard" step-wise AP, reported next to BoB's number because
  the two differ (a single positive at rank 2 gives 0.5 with the step rule and 0.25 with the trapezoid).

Conventions used throughout
---------------------------
* Descriptors are L2-normalised (a zero vector stays zero, like ``torch.nn.functional.normalize``) and
  compared by dot product, i.e. cosine similarity, computed in float64.
* The database is ranked per query by a *stable* sort of descending similarity, so tied database items keep
  ascending database-index order. The original used ``torch.argsort`` (unstable on GPU), whose tie order is
  arbitrary; only the rank-based metrics (``mAP_revisited``, ``MRR``, ``P@k``, ``R@k``) can see tie order.
  ``mAP`` (scikit-learn's definition) groups tied scores into one threshold and is independent of tie order.
* ``ranks`` arrays in this module are **one row per query** (``[num_queries, num_ranked]``, database indices
  in rank order). revisitop and BoB store the transpose (``db_size x num_queries``): pass ``ranks.T`` there.
* Queries with no positive in the database are skipped in every mean except MRR, which BoB divides by the
  number of all queries (a query without positives contributes 0).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

__all__ = [
    "DIFFICULTIES",
    "RETRIEVAL_PROTOCOLS",
    "average_precision_trapezoid",
    "bob_descriptor",
    "check_protocol",
    "class_folder_retrieval",
    "class_folder_split",
    "l2_normalize",
    "metrics_from_scores",
    "rank_database",
    "retrieval_metrics",
    "revisited_evaluate",
    "revisited_ground_truth",
    "revisited_map",
    "revisited_per_query",
    "revisited_retrieval",
    "revisited_task",
    "source_names",
]

_log = logging.getLogger(__name__)

Difficulty = Literal["easy", "medium", "hard"]


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------


def _check_ks(ks: Sequence[int], name: str = "ks") -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"{name} must be a non-empty sequence of integers >= 1, got {ks!r}.")
    return ks


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation in float64; rows with norm below ``eps`` are divided by ``eps``.

    Mirrors ``torch.nn.functional.normalize(x, dim=1, p=2)`` (norm clamped at ``eps``), so an all-zero
    descriptor stays zero and gets similarity 0 with everything instead of producing NaNs.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"descriptors must be a 2-D array [num_items, dim], got shape {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ValueError("descriptors contain NaN or inf; check the feature extractor (mixed precision?).")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def average_precision_trapezoid(positive_ranks: np.ndarray, num_positives: int) -> float:
    """Average precision with the revisited Oxford/Paris trapezoidal rule (revisitop / BoB ``compute_ap``).

    For the sorted 0-based ranks ``r_j`` (j = 0, 1, ...) of the retrieved positives and ``nres`` positives::

        precision_0(j) = 1            if r_j == 0
                       = j / r_j      otherwise        (precision just before the j-th positive)
        precision_1(j) = (j + 1) / (r_j + 1)            (precision just after it)
        ap = sum_j (1 / nres) * (precision_0(j) + precision_1(j)) / 2

    i.e. trapezoids under the precision-recall curve, one per recall step of ``1/nres``. A single positive at
    rank 2 (1-based; ``r_0 = 1``) gives ``(0 + 1/2) / 2 = 0.25``, where the step rule gives 0.5. Positives
    missing from ``positive_ranks`` (e.g. a truncated ranking) still count in ``nres`` and add nothing.
    """
    r = np.asarray(positive_ranks, dtype=np.float64)
    if num_positives <= 0:
        raise ValueError(f"num_positives must be >= 1, got {num_positives}.")
    if r.size == 0:
        return 0.0
    j = np.arange(r.size, dtype=np.float64)
    p0 = np.where(r == 0, 1.0, j / np.maximum(r, 1.0))
    p1 = (j + 1.0) / (r + 1.0)
    return float(np.sum((p0 + p1) / 2.0) / num_positives)


def rank_database(query_desc: np.ndarray, db_desc: np.ndarray, *, chunk_size: int = 1024) -> np.ndarray:
    """Database indices per query, best first: ``[num_queries, num_db]`` int64.

    Cosine similarity of L2-normalised descriptors, stable descending sort (ties keep ascending database
    index). Rows are per query; revisitop's ``compute_map`` wants the transpose.
    """
    q, db = _normalized_pair(query_desc, db_desc)
    out = np.empty((q.shape[0], db.shape[0]), dtype=np.int64)
    for start in range(0, q.shape[0], chunk_size):
        sim = q[start : start + chunk_size] @ db.T
        out[start : start + chunk_size] = np.argsort(-sim, axis=1, kind="stable")
    return out


def _normalized_pair(query_desc, db_desc) -> tuple[np.ndarray, np.ndarray]:
    q = l2_normalize(query_desc)
    db = l2_normalize(db_desc)
    if q.shape[1] != db.shape[1]:
        raise ValueError(
            f"query descriptors have dim {q.shape[1]} but database descriptors have dim {db.shape[1]}; "
            "both must come from the same backbone and pooling."
        )
    if db.shape[0] == 0:
        raise ValueError("the database is empty; nothing to retrieve.")
    return q, db


# ----------------------------------------------------------------------------------------------------------
# Label-based retrieval (class-folder datasets: INSTRE, CUB-200, ObjectNet, iNat, ...)
# ----------------------------------------------------------------------------------------------------------


def metrics_from_scores(
    scores: np.ndarray, relevant: np.ndarray, *, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, np.ndarray]:
    """Per-query metrics from a dense score matrix; the vectorised core of :func:`retrieval_metrics`.

    Args:
      scores: ``[num_queries, num_db]`` similarities, higher is better.
      relevant: ``[num_queries, num_db]`` bool, True where the database item is a positive for the query.
      ks: cut-offs for P@k and R@k.

    Returns per-query float64 arrays (NaN where a query has no positive, except ``RR`` which is 0 there):
      ``AP`` (scikit-learn step rule, ties grouped), ``AP_revisited`` (trapezoid), ``RR`` (reciprocal rank of
      the first positive), ``P@k`` and ``R@k`` for each k, plus ``num_positives`` (int array).
    Definitions, with the database stably sorted by descending score, ``rel_i`` the relevance at 0-based rank
    ``i``, ``hits(i) = sum_{i' <= i} rel_i'`` and ``npos = hits(N - 1)``:

    * ``AP = sum_t (R_t - R_{t-1}) * P_t`` over distinct score thresholds ``t`` taken in descending order,
      where ``P_t`` / ``R_t`` are precision / recall of "score >= t" -- exactly
      ``sklearn.metrics.average_precision_score(relevant[q], scores[q])``.
    * ``AP_revisited``: :func:`average_precision_trapezoid` of the positive ranks.
    * ``RR = 1 / (first positive rank, 1-based)``.
    * ``P@k = hits(k_q - 1) / k_q`` with ``k_q = min(last positive rank (1-based), k)`` -- revisitop's
      mP@k and BoB's "prs": a query whose positives all sit above rank k is not penalised for the empty
      slots (so P@10 can be 1 with only 3 positives).
    * ``R@k = hits(min(k, N) - 1) / npos`` -- BoB's recall: the fraction of the query's positives that appear
      in the top k (not the deep-metric-learning "at least one hit" Recall@K).
    """
    ks = _check_ks(ks)
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    if scores.ndim != 2 or scores.shape != relevant.shape:
        raise ValueError(
            "scores and relevant must be 2-D arrays of the same shape, "
            f"got {scores.shape} and {relevant.shape}."
        )
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; a NaN similarity has no place in a ranking.")
    nq, n = scores.shape
    if n == 0:
        raise ValueError("the database is empty; nothing to retrieve.")
    rows = np.arange(nq)[:, None]
    order = np.argsort(-scores, axis=1, kind="stable")
    s = scores[rows, order]
    rel = relevant[rows, order]
    del order
    idx_dtype = np.int32 if n < 2**31 - 1 else np.int64
    hits = np.cumsum(rel, axis=1, dtype=idx_dtype)
    npos = hits[:, -1].astype(np.int64)
    valid = npos > 0
    safe_npos = np.where(valid, npos, 1).astype(np.float64)
    nan = np.float64("nan")
    out: dict[str, np.ndarray] = {"num_positives": npos}
    # Only positive positions contribute to AP; work on their (query, rank) pairs to keep memory at O(#pos).
    pq, pr = np.nonzero(rel)
    j = hits[pq, pr].astype(np.float64) - 1.0  # 0-based index of the positive among the query's positives
    r = pr.astype(np.float64)

    # scikit-learn AP: every positive is credited with the precision at the *end* of its tie group (the last
    # index holding the same score), because a threshold admits a whole tie group at once.
    is_end = np.ones_like(rel)
    is_end[:, :-1] = s[:, :-1] != s[:, 1:]
    del s
    end_idx = np.where(is_end, np.arange(n, dtype=idx_dtype)[None, :], idx_dtype(n))
    del is_end
    end_idx = np.minimum.accumulate(end_idx[:, ::-1], axis=1)[:, ::-1]
    e = end_idx[pq, pr]
    del end_idx
    step = hits[pq, e] / (e + 1.0)
    out["AP"] = np.where(valid, np.bincount(pq, weights=step, minlength=nq) / safe_npos, nan)

    p0 = np.where(r == 0, 1.0, j / np.maximum(r, 1.0))
    p1 = (j + 1.0) / (r + 1.0)
    trap = np.bincount(pq, weights=(p0 + p1) / 2.0, minlength=nq)
    out["AP_revisited"] = np.where(valid, trap / safe_npos, nan)

    first = np.argmax(rel, axis=1)
    out["RR"] = np.where(valid, 1.0 / (first + 1.0), 0.0)

    last_1based = n - np.argmax(rel[:, ::-1], axis=1)
    for k in ks:
        kq = np.minimum(last_1based, k)
        out[f"P@{k}"] = np.where(valid, hits[np.arange(nq), kq - 1] / kq, nan)
        out[f"R@{k}"] = np.where(valid, hits[:, min(k, n) - 1] / safe_npos, nan)
    return out


def retrieval_metrics(
    query_desc: np.ndarray,
    db_desc: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    *,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | None = None,
    return_per_query: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, np.ndarray]]:
    """Label-based retrieval metrics of one backbone's descriptors; positives share the query's label.

    With ``return_per_query=True`` also returns the per-query arrays of :func:`metrics_from_scores`
    (for bootstrap confidence intervals over queries).

    Descriptors are L2-normalised and compared by cosine similarity; each query ranks the whole database
    (stable sort, ties in database-index order). Returned keys (definitions in :func:`metrics_from_scores`):

    * ``mAP``: mean over queries of scikit-learn's ``average_precision_score`` (step rule, ties grouped).
    * ``mAP_revisited``: mean trapezoidal AP -- the number BoB reports as "map" (``compute_ap``).
    * ``MRR``: ``sum_q RR_q / num_queries`` over *all* queries (0 for a query without positives), as BoB.
    * ``P@k``: mean revisitop precision with ``k_q = min(last positive rank, k)`` (BoB's "prs").
    * ``R@k``: mean fraction of each query's positives found in the top k (BoB's "recalls").

    Every mean except MRR skips queries with no positive in the database (revisitop / BoB); a warning says how
    many. Values are fractions in [0, 1] (BoB logged mAP x 100). Queries are processed ``chunk_size`` at a
    time; the default picks ``chunk_size`` so one block holds about 2**24 similarities (~1 GiB of
    temporaries).
    """
    ks = _check_ks(ks)
    q, db = _normalized_pair(query_desc, db_desc)
    query_labels = np.asarray(query_labels)
    db_labels = np.asarray(db_labels)
    if query_labels.shape != (q.shape[0],) or db_labels.shape != (db.shape[0],):
        raise ValueError(
            f"labels must be 1-D with one entry per descriptor: query_labels {query_labels.shape} for "
            f"{q.shape[0]} queries, db_labels {db_labels.shape} for {db.shape[0]} database items."
        )
    if q.shape[0] == 0:
        raise ValueError("there are no queries.")
    if chunk_size is None:
        chunk_size = max(1, 2**24 // db.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}.")
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, q.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        scores = q[sl] @ db.T
        relevant = query_labels[sl, None] == db_labels[None, :]
        parts.append(metrics_from_scores(scores, relevant, ks=ks))
    per_query = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    metrics = _aggregate(per_query, ks, map_keys={"AP": "mAP", "AP_revisited": "mAP_revisited"})
    return (metrics, per_query) if return_per_query else metrics


def _aggregate(per_query: Mapping[str, np.ndarray], ks: Sequence[int], map_keys: Mapping[str, str]) -> dict:
    valid = per_query["num_positives"] > 0
    num_queries = valid.size
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ValueError(
            f"none of the {num_queries} queries has a positive in the database; check that query and "
            "database labels use the same label space (and, for revisited Oxford/Paris, the difficulty)."
        )
    if n_valid < num_queries:
        _log.warning(
            "%d of %d queries have no positive in the database and are left out of the means (MRR still "
            "divides by all queries).",
            num_queries - n_valid,
            num_queries,
        )
    out = {dst: float(np.mean(per_query[src][valid])) for src, dst in map_keys.items()}
    out["MRR"] = float(np.sum(per_query["RR"]) / num_queries)
    for k in ks:
        out[f"P@{k}"] = float(np.mean(per_query[f"P@{k}"][valid]))
    for k in ks:
        out[f"R@{k}"] = float(np.mean(per_query[f"R@{k}"][valid]))
    return out


def class_folder_split(
    names: Sequence[str],
    labels: np.ndarray,
    query_fraction: float = 0.2,
    *,
    max_per_class: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Query / database split of a class-folder dataset, as BoB's ``TwoLeveldataset`` protocol (bob-spec 3.6).

    Per class (classes in sorted label order): sort the class's file names (plain string order), optionally
    keep only the first ``max_per_class`` of them (BoB: INSTRE-S1 and ObjectNet <= 50, iNat val <= 5 per
    class; the items past the cap are dropped from queries *and* database), then the first
    ``int(query_fraction * n)`` are queries and the rest the database -- ``TwoLeveldataset``'s
    ``till = int((len(files) * qvs) // 1)`` in ``bob-retrieval/retrieval/utils.py``. A class with
    ``n < 1 / query_fraction`` items (``n < 5`` at the default 0.2) therefore yields **no query**; its items
    stay in the database as distractors for the other classes' queries. Every query has at least one
    same-class database item (``int(f * n) < n``).

    Args:
      names: one file name (or path) per item; only their order within a class matters.
      labels: one class label per item.
      query_fraction: share of each class used as queries, in (0, 1).
      max_per_class: optional cap on items per class, applied before splitting.

    Returns:
      ``(query_idx, db_idx)``: int64 indices into ``names``, ordered by (class, name).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(names) != labels.shape[0]:
        raise ValueError(
            f"need one label per name: got {len(names)} names and labels of shape {labels.shape}."
        )
    if not 0.0 < query_fraction < 1.0:
        raise ValueError(f"query_fraction must lie in (0, 1), got {query_fraction}.")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}.")
    query_idx: list[int] = []
    db_idx: list[int] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        # sorted() is stable, so duplicate names keep their input order and the split stays deterministic.
        members = sorted(members.tolist(), key=lambda i: str(names[i]))
        if max_per_class is not None:
            members = members[:max_per_class]
        n_query = int(len(members) * query_fraction)  # BoB's float product, truncated
        query_idx.extend(members[:n_query])
        db_idx.extend(members[n_query:])
    return np.asarray(query_idx, dtype=np.int64), np.asarray(db_idx, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------
# Revisited Oxford / Paris protocol (explicit ground truth with junk)
# ----------------------------------------------------------------------------------------------------------


def revisited_ground_truth(gnd: Sequence[Mapping], difficulty: Difficulty) -> list[dict[str, np.ndarray]]:
    """Per-query ``{"ok", "junk"}`` lists of one revisited-protocol difficulty, from ``easy/hard/junk``.

    * ``easy``:   ok = easy,        junk = junk + hard
    * ``medium``: ok = easy + hard, junk = junk            (BoB evaluates ROxford / RParis this way)
    * ``hard``:   ok = hard,        junk = junk + easy

    ``gnd`` is revisitop's ``cfg["gnd"]`` (from ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl``): one dict per
    query with integer database indices under ``easy``, ``hard`` and ``junk`` (other keys, e.g. ``bbx``, are
    ignored).
    """
    parts = {
        "easy": (("easy",), ("junk", "hard")),
        "medium": (("easy", "hard"), ("junk",)),
        "hard": (("hard",), ("junk", "easy")),
    }
    if difficulty not in parts:
        raise ValueError(f"difficulty must be one of {sorted(parts)}, got {difficulty!r}.")
    ok_keys, junk_keys = parts[difficulty]
    out = []
    for i, g in enumerate(gnd):
        missing = [key for key in ("easy", "hard", "junk") if key not in g]
        if missing:
            raise ValueError(
                f"ground truth of query {i} lacks {missing}; expected revisitop's easy/hard/junk."
            )

        def cat(keys, g=g):
            return np.concatenate([np.asarray(g[key], dtype=np.int64).reshape(-1) for key in keys])

        out.append({"ok": cat(ok_keys), "junk": cat(junk_keys)})
    return out


def revisited_per_query(
    ranks: np.ndarray, gnd: Sequence[Mapping], kappas: Sequence[int] = (1, 5, 10)
) -> dict[str, np.ndarray]:
    """Per-query trapezoidal AP, P@k, R@k and reciprocal rank with junk removed from the ranking.

    ``ranks``: ``[num_queries, num_ranked]`` database indices in rank order (one row per query; revisitop's
    layout is the transpose). ``gnd``: one mapping per query with ``ok`` (positives) and optional ``junk``.

    For each query: positives' and junk items' 0-based positions in its ranking are found; every positive is
    moved up by the number of junk items ranked before it (junk is removed, never counted as a negative); then
    ``AP`` = :func:`average_precision_trapezoid` with ``nres = len(ok)``, ``P@k = hits(k_q) / k_q`` with
    ``k_q = min(last positive position (1-based), k)``, ``R@k`` = share of ``ok`` within the first k, all on
    the junk-free positions. ``RR`` = 1 / (first positive position + 1) is taken *before* junk removal, as
    BoB's ``compute_map`` does. Queries with empty ``ok`` get NaN everywhere (``RR`` 0); positives absent from
    a truncated ranking count in ``nres`` but are never retrieved (0 where the original would crash).
    """
    kappas = _check_ks(kappas, "kappas")
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(
            f"ranks must be a 2-D integer array [num_queries, num_ranked], got {ranks.dtype} {ranks.shape}."
        )
    if ranks.shape[0] != len(gnd):
        raise ValueError(
            f"ranks has {ranks.shape[0]} rows but there are {len(gnd)} ground-truth entries. ranks must be "
            "one row per query; revisitop/BoB store db_size x num_queries, so pass ranks.T for that layout."
        )
    nq = len(gnd)
    out = {
        name: np.full(nq, np.nan) for name in ["AP", *(f"P@{k}" for k in kappas), *(f"R@{k}" for k in kappas)]
    }
    out["RR"] = np.zeros(nq)
    out["num_positives"] = np.zeros(nq, dtype=np.int64)
    for i, g in enumerate(gnd):
        ok = np.asarray(g["ok"], dtype=np.int64).reshape(-1)
        junk = np.asarray(g.get("junk", ()), dtype=np.int64).reshape(-1)
        out["num_positives"][i] = ok.size
        if ok.size == 0:
            continue
        pos = np.flatnonzero(np.isin(ranks[i], ok))
        junk_pos = np.flatnonzero(np.isin(ranks[i], junk))
        if pos.size == 0:
            out["AP"][i] = 0.0
            for k in kappas:
                out[f"P@{k}"][i] = 0.0
                out[f"R@{k}"][i] = 0.0
            continue
        out["RR"][i] = 1.0 / (pos[0] + 1.0)
        # Number of junk positions strictly before each positive (revisitop's two-pointer loop).
        pos = pos - np.searchsorted(junk_pos, pos, side="left")
        out["AP"][i] = average_precision_trapezoid(pos, ok.size)
        pos1 = pos + 1
        for k in kappas:
            kq = min(int(pos1[-1]), k)
            out[f"P@{k}"][i] = np.count_nonzero(pos1 <= kq) / kq
            out[f"R@{k}"][i] = np.count_nonzero(pos1 <= k) / ok.size
    return out


def revisited_map(
    ranks: np.ndarray, gnd: Sequence[Mapping], kappas: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Revisited Oxford/Paris evaluation (revisitop ``compute_map`` plus BoB's recall and MRR).

    Returns ``mAP`` (mean trapezoidal AP with junk removed -- the official revisitop number), ``P@k``
    (revisitop's mP@k), ``R@k`` and ``MRR``; per-query definitions in :func:`revisited_per_query`. Means skip
    queries whose ``ok`` list is empty, as the official code does; MRR divides by all queries, as BoB does.
    Pass the ``ok/junk`` lists of one difficulty, e.g. ``revisited_ground_truth(cfg["gnd"], "medium")``.
    """
    kappas = _check_ks(kappas, "kappas")
    per_query = revisited_per_query(ranks, gnd, kappas)
    return _aggregate(per_query, kappas, map_keys={"AP": "mAP"})


def revisited_evaluate(
    ranks: np.ndarray, gnd: Sequence[Mapping], kappas: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[str, float]]:
    """:func:`revisited_map` for each difficulty: ``{"easy": {...}, "medium": {...}, "hard": {...}}``."""
    return {
        d: revisited_map(ranks, revisited_ground_truth(gnd, d), kappas) for d in ("easy", "medium", "hard")
    }


# ----------------------------------------------------------------------------------------------------------
# Protocols: the descriptors of one evaluation source -> metrics (what the retrieval task reports)
# ----------------------------------------------------------------------------------------------------------

DIFFICULTIES: tuple[Difficulty, ...] = ("easy", "medium", "hard")


def class_folder_retrieval(
    descriptors: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    *,
    query_fraction: float = 0.2,
    max_per_class: int | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """BoB's class-folder retrieval (CUB-200, INSTRE-S1, ObjectNet, iNat): one source split into queries and
    database by :func:`class_folder_split`, then :func:`retrieval_metrics` with same class = positive.

    ``descriptors``, ``labels`` and ``names`` describe the same items in the same order. Returns the metrics
    (plus ``num_queries`` / ``num_database``) and the per-query arrays, in query order.
    """
    descriptors = np.asarray(descriptors)
    labels = np.asarray(labels)
    if descriptors.ndim != 2 or descriptors.shape[0] != labels.shape[0] or len(names) != labels.shape[0]:
        raise ValueError(
            f"need one descriptor, label and name per item: got descriptors {descriptors.shape}, labels "
            f"{labels.shape} and {len(names)} names."
        )
    query_idx, db_idx = class_folder_split(names, labels, query_fraction, max_per_class=max_per_class)
    if query_idx.size == 0:
        raise ValueError(
            f"no class yields a query: int({query_fraction} * n) is 0 for every class size n (largest "
            f"{int(np.max(np.unique(labels, return_counts=True)[1], initial=0))}). Use a dataset with more "
            "images per class, or a larger query_fraction."
        )
    metrics, per_query = retrieval_metrics(
        descriptors[query_idx], descriptors[db_idx], labels[query_idx], labels[db_idx], ks=ks,
        return_per_query=True,
    )
    metrics.update(num_queries=int(query_idx.size), num_database=int(db_idx.size))
    return metrics, per_query


def revisited_retrieval(
    query_desc: np.ndarray,
    db_desc: np.ndarray,
    gnd: Sequence[Mapping],
    *,
    kappas: Sequence[int] = (1, 5, 10),
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Revisited Oxford / Paris on descriptors: rank the database per query, evaluate every difficulty.

    ``gnd`` is revisitop's ``cfg["gnd"]`` (one ``easy/hard/junk`` dict per query, database indices). Returns
    flat metrics ``"{name}_{difficulty}"`` for ``mAP``, ``P@k`` (revisitop's mP@k), ``R@k`` and ``MRR``
    (BoB's additions) with difficulty ``easy``, ``medium`` (BoB's number), ``hard``; and per-query arrays
    keyed the same way (``AP_medium``, ...), NaN for a query without positives at that difficulty.
    """
    kappas = _check_ks(kappas, "kappas")
    if len(gnd) != np.asarray(query_desc).shape[0]:
        raise ValueError(
            f"{np.asarray(query_desc).shape[0]} query descriptors but {len(gnd)} ground-truth entries; the "
            "queries must be exactly the ground truth's qimlist, in order."
        )
    ranks = rank_database(query_desc, db_desc)
    metrics: dict[str, float] = {}
    per_query: dict[str, np.ndarray] = {}
    for difficulty in DIFFICULTIES:
        per = revisited_per_query(ranks, revisited_ground_truth(gnd, difficulty), kappas)
        per_query.update({f"{name}_{difficulty}": values for name, values in per.items()})
        means = _aggregate(per, kappas, map_keys={"AP": "mAP"})  # what revisited_map returns
        metrics.update({f"{name}_{difficulty}": value for name, value in means.items()})
    return metrics, per_query


# ----------------------------------------------------------------------------------------------------------
# The retrieval task's protocols and the original's descriptor per backbone family
# ----------------------------------------------------------------------------------------------------------

RETRIEVAL_PROTOCOLS = ("split", "class_folder", "revisited")


def check_protocol(protocol: str) -> str:
    if protocol not in RETRIEVAL_PROTOCOLS:
        raise ValueError(
            f"retrieval protocol {protocol!r}: use 'split' (test queries against the train database), "
            "'class_folder' (one class-folder source, the first int(0.2 n) sorted names per class are "
            "queries) or "
            "'revisited' (ROxford5k / RParis6k, dataset 'revisited:<name>')"
        )
    return protocol


def source_names(source) -> Sequence[str]:
    """The evaluation source's file names (class-folder protocol); a clear error for sources without them."""
    names = getattr(source, "names", None)
    if names is None:
        raise ValueError(
            f"the class_folder retrieval protocol sorts each class by file name, but {source!r} has no file "
            "names; use a class-folder dataset: --config.dataset.name=folder:<root> with test_split=all"
        )
    return names()


def revisited_task(test, source, *, ks: Sequence[int]) -> tuple[dict[str, float], np.ndarray]:
    """The retrieval task on a :class:`~bob_jax.data.revisited.RevisitedSource`: ``test`` holds the features
    of the whole source (database, then queries). Returns the metrics of :func:`revisited_retrieval` plus
    ``num_queries`` / ``num_database``, and the per-query Medium AP."""
    from bob_jax.data.revisited import RevisitedSource

    if not isinstance(source, RevisitedSource):
        raise ValueError(
            "the revisited retrieval protocol needs the whole revisited source (dataset "
            f"'revisited:roxford5k' or 'revisited:rparis6k', test_size=0), got {source!r}"
        )
    if not np.array_equal(np.asarray(test.labels), source.labels()):
        raise ValueError(
            f"the features ({len(test.labels)} rows) do not follow {source!r}'s database-then-queries order"
        )
    n = source.num_database
    metrics, per_query = revisited_retrieval(test.features[n:], test.features[:n], source.gnd, kappas=ks)
    metrics.update(num_queries=source.num_queries, num_database=n)
    return metrics, per_query["AP_medium"]


def bob_descriptor(model) -> str:
    """The feature output that reproduces the original's retrieval descriptor for ``model``.

    Read from ``hsouri/bob-retrieval`` (``retrieval/main_ret.py``, ``utils.extract_features``, ``models/``):

    * timm models (supervised, DINO, ...) run ``timm.create_model(arch, num_classes=0)(x)``: ``"pooled"``.
    * CLIP ViTs: ``forward_features(x)[:, 0, :]``, the class token after the final norm and before the
      visual projection. MAE and MoCo v3 ViTs: their own ``forward_features``, which already return
      ``norm(x)[:, 0]`` (``models/vit_mae.py`` with its default ``global_pool=False``; ``models/mocov3.py``,
      whose ``pre_logits`` is the identity) -- no token sequence is pooled or flattened. This class token is
      ``"pooled"`` when the model pools its class token without fc_norm (the same array, extracted once for
      every task), else the registered ``"cls_token"`` descriptor.
    * CLIP ResNets: ``forward_features`` is the attention pool *with* its output projection, CLIP's image
      embedding, which is these models' ``"logits"``.
    * MiDaS encoders: ``model(x)`` through the 1000-way ImageNet head the DPT checkpoint still holds:
      ``"logits"`` (bob-spec 5.1).
    * VICReg ResNet-50 (its own avgpool output) and everything else: ``"pooled"``.
    """
    from bob_jax.backbones import zoo

    arch, _, tag = str(model.name).partition(".")
    family = zoo.ARCH_TO_FAMILY.get(arch)
    family = family.name if family is not None else ""
    if family == "vit" and ("_clip_" in arch or tag in ("mae", "mocov3")):
        cfg = model.cfg
        return "pooled" if cfg.global_pool == "token" and not cfg.use_fc_norm else "cls_token"
    if family == "clip_resnet" or tag == "midas_v31":
        return "logits"
    return "pooled"
