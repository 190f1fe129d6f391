"""Cost beside quality: GFLOPs per image, measured throughput and the score-vs-cost Pareto front.

* **GFLOPs** (:func:`gflops_per_backbone`): analytic forward FLOPs per image (2 x MACs of convolutions,
  linear layers and attention matmuls, the timm / fvcore convention of :mod:`bob_jax.bench.flops`). A
  record's own ``gflops`` is used when present; otherwise it is computed from ``backbone_name`` (for a pool
  record without one: the backbone name before any ``@weights`` suffix) and ``input_size`` with
  :func:`bob_jax.bench.flops.analytic_gflops` when the architecture is known, else the backbone has no
  count. The count depends on the input size, and one backbone's records may use several: a backbone gets
  its count at its most common input size among the records with a count (ties: the smaller size), and
  :attr:`Gflops.sizes` keeps every size so the report can say so.
* **Throughput** (:func:`load_bench`, :func:`match_throughput`): measured forward img/s of the bob_jax (JAX)
  model from the ``bench.json`` that ``python -m bob_jax.bench`` writes (:mod:`bob_jax.bench.report`),
  one column per (device, dtype) so that every figure names the device it was measured on. Benchmark rows
  name ``arch.tag``; a backbone matches a row of its own name, else a row of its architecture (weights do not
  change speed). Among several matching rows of one column the row at the backbone's GFLOPs input size is
  preferred, then an exact name, then the largest batch, then the later row.
* **Pareto front** (:func:`pareto_front`): the backbones no other backbone beats on both score and cost
  (higher overall z and lower GFLOPs, or higher img/s).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Gflops",
    "Throughput",
    "arch_names",
    "gflops_per_backbone",
    "load_bench",
    "match_throughput",
    "pareto_front",
    "throughput_label",
]


# ----------------------------------------------------------------------------------------------------------
# GFLOPs
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Gflops:
    """One backbone's forward GFLOPs per image at ``input_size`` px (None: a record gave no size).

    ``source``: ``"record"`` (the records' own ``gflops``) or ``"analytic"`` (computed here);
    ``sizes``: input size -> number of the backbone's records with a count at that size.
    """

    value: float
    input_size: int | None
    source: str
    sizes: dict[int | None, int]

    @property
    def mixed_sizes(self) -> bool:
        return len(self.sizes) > 1


def _record_name(rec: Mapping[str, Any]) -> str:
    return f"record {rec.get('key', '?')!s} ({rec.get('backbone', '?')})"


def _input_size(rec: Mapping[str, Any]) -> int | None:
    size = rec.get("input_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0 or size != int(size):
        raise ValueError(
            f"{_record_name(rec)}: input_size = {size!r} is not a positive integer (pixels per side)."
        )
    return int(size)


def _record_gflops(rec: Mapping[str, Any]) -> float | None:
    g = rec.get("gflops")
    if g is None:
        return None
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g <= 0:
        raise ValueError(f"{_record_name(rec)}: gflops = {g!r} is not a positive number.")
    return float(g)


def _arch_name(rec: Mapping[str, Any]) -> str:
    """The ``arch.tag`` a record's backbone was built from (``backbone`` labels may add ``@weights``)."""
    return str(rec.get("backbone_name") or str(rec["backbone"]).partition("@")[0])


def arch_names(records: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """backbone -> the ``arch.tag`` it was built from (its first record's ``backbone_name``, else its name
    before any ``@weights``), for matching benchmark rows."""
    out: dict[str, str] = {}
    for rec in records:
        out.setdefault(str(rec["backbone"]), _arch_name(rec))
    return out


def gflops_per_backbone(records: Iterable[Mapping[str, Any]]) -> tuple[dict[str, Gflops], list[str]]:
    """backbone -> :class:`Gflops` (module docstring), and notes on counts that could not be made.

    Raises ValueError for a record whose ``gflops`` or ``input_size`` is not a positive number.
    """
    from bob_jax.bench.flops import analytic_gflops

    per_bb: dict[str, list[tuple[int | None, float, str]]] = defaultdict(list)
    notes: list[str] = []
    known_archs: set[str] | None = None
    for rec in records:
        size, given = _input_size(rec), _record_gflops(rec)
        backbone = str(rec["backbone"])
        if given is not None:
            per_bb[backbone].append((size, given, "record"))
            continue
        if size is None:
            continue
        name = _arch_name(rec)
        if known_archs is None:
            from bob_jax.backbones import zoo  # imported only when a count has to be computed

            known_archs = set(zoo.ARCH_TO_FAMILY)
        if name.partition(".")[0] not in known_archs:
            continue
        try:
            value = analytic_gflops(name, size)
        except ValueError as e:
            notes.append(f"{backbone}: no GFLOPs at {size} px ({e}).")
            continue
        if value is not None:
            per_bb[backbone].append((size, value, "analytic"))
    def size_order(s: int | None) -> tuple[bool, int]:
        return s is None, s or 0  # smaller first, a missing size last

    out = {}
    for backbone, entries in per_bb.items():
        sizes = Counter(size for size, _, _ in entries)
        size = min(sizes, key=lambda s: (-sizes[s], *size_order(s)))  # the most common size
        at_size = [(g, src) for s, g, src in entries if s == size]
        recorded = [g for g, src in at_size if src == "record"]
        # The job's own count wins over a recomputation; several counts (a head counted in some): the trunk.
        value, source = (min(recorded), "record") if recorded else (min(g for g, _ in at_size), "analytic")
        out[backbone] = Gflops(value, size, source, {s: sizes[s] for s in sorted(sizes, key=size_order)})
    return out, notes


# ----------------------------------------------------------------------------------------------------------
# Throughput from the benchmark harness
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Throughput:
    """One forward-throughput measurement of ``python -m bob_jax.bench`` (a row of its bench.json)."""

    model: str
    img_s: float
    device: str
    dtype: str
    batch: int | None
    size: int | None
    source: str


def throughput_label(device: str, dtype: str) -> str:
    """Column name of the img/s measured on ``device`` in ``dtype``."""
    return f"img/s [{device}, {dtype}]"


def load_bench(path: str | Path) -> list[Throughput]:
    """The forward img/s of every row of a bench.json that has one (rows that failed or timed only the
    training step or timm are left out). The device is the row's ``device``, else the file's
    ``environment.device_kind``; ValueError when a file is not a benchmark report or names no device.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"benchmark file {path} does not exist (give the bench.json written by python -m bob_jax.bench)."
        )
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"benchmark file {path} is not JSON ({e}).") from None
    if not isinstance(report, dict) or not isinstance(report.get("models"), list):
        raise ValueError(
            f"benchmark file {path} has no 'models' list; give the bench.json that python -m bob_jax.bench "
            "writes."
        )
    env_device = (report.get("environment") or {}).get("device_kind")
    out = []
    for i, row in enumerate(report["models"], start=1):
        if not isinstance(row, dict) or not isinstance(row.get("model"), str):
            raise ValueError(f"benchmark file {path}: row {i} is not an object with a 'model' name.")
        img_s = row.get("jax_img_s")
        if row.get("error") or img_s is None:
            continue
        if isinstance(img_s, bool) or not isinstance(img_s, (int, float)) or not 0 < img_s < math.inf:
            raise ValueError(
                f"benchmark file {path}: row {i} ({row['model']}) has jax_img_s = {img_s!r}, not a positive "
                "number."
            )
        device = row.get("device") or env_device
        if not device:
            raise ValueError(
                f"benchmark file {path}: row {i} ({row['model']}) names no device (neither the row's "
                "'device' nor environment.device_kind); a throughput without its device cannot be reported."
            )
        out.append(Throughput(row["model"], float(img_s), str(device), str(row.get("dtype", "?")),
                              row.get("batch"), row.get("size"), str(path)))
    return out


def match_throughput(
    names: Mapping[str, str], rows: Sequence[Throughput], sizes: Mapping[str, int | None] | None = None
) -> dict[str, dict[str, Throughput]]:
    """column label -> backbone -> the measurement used (module docstring for the matching).

    ``names``: backbone -> its ``arch.tag``; ``sizes``: backbone -> preferred input size (its GFLOPs size).
    Columns are ordered by first appearance in ``rows``.
    """
    sizes = sizes or {}
    out: dict[str, dict[str, Throughput]] = {}
    for row in rows:
        out.setdefault(throughput_label(row.device, row.dtype), {})
    for backbone, name in names.items():
        arch = name.partition(".")[0]
        best: dict[str, tuple[tuple, Throughput]] = {}
        for order, row in enumerate(rows):
            exact = row.model == name
            if not exact and row.model.partition(".")[0] != arch:
                continue
            key = (row.size == sizes.get(backbone), exact, row.batch or 0, order)
            label = throughput_label(row.device, row.dtype)
            if label not in best or key > best[label][0]:
                best[label] = (key, row)
        for label, (_, row) in best.items():
            out[label][backbone] = row
    return out


# ----------------------------------------------------------------------------------------------------------
# Pareto front
# ----------------------------------------------------------------------------------------------------------


def pareto_front(
    score: Sequence[float], cost: Sequence[float], *, higher_cost_is_better: bool = False
) -> np.ndarray:
    """Boolean mask of the points no other point dominates (at least as good on both, better on one).

    Higher ``score`` is better; lower ``cost`` is better unless ``higher_cost_is_better`` (throughput).
    Identical points are on the front together. O(n log n): sweep in order of cost (best first), a point is
    on the front when it beats every score seen so far, or repeats the point that set the best.
    """
    score = np.asarray(score, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    if score.shape != cost.shape or score.ndim != 1:
        raise ValueError(
            f"pareto_front needs two 1-D arrays of equal length, got {score.shape} and {cost.shape}."
        )
    if not (np.isfinite(score).all() and np.isfinite(cost).all()):
        raise ValueError("pareto_front needs finite scores and costs (leave unknown costs out).")
    c = -cost if higher_cost_is_better else cost
    on_front = np.zeros(score.shape, dtype=bool)
    best_score, best_cost = -np.inf, None
    for i in np.lexsort((-score, c)):  # cost ascending, then score descending
        if score[i] > best_score:
            on_front[i] = True
            best_score, best_cost = score[i], c[i]
        elif score[i] == best_score and c[i] == best_cost:
            on_front[i] = True
    return on_front
