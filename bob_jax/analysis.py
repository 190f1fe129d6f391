"""Analyses beside the ranking: external result pools, cross-task correlations, size tiers, bootstrap CIs.

* **Pool files** (:func:`load_pool`) let a user rank a new backbone against published numbers without
  re-running the reference pool (bob-spec.md section 6). One row per (backbone, setting), as CSV with a header
  row or as JSON lines (one object per line, ``.jsonl`` / ``.ndjson`` / ``.json``):

  ==================  ========  ========================================================================
  column              required  meaning
  ==================  ========  ========================================================================
  ``backbone``        yes       backbone name (merged with store records of the same name)
  ``task``            yes       task, e.g. ``retrieval``; z-scores are averaged per task
  ``dataset``         yes       dataset of the setting, e.g. ``roxford5k``
  ``split``           yes       evaluated split, e.g. ``test``
  ``protocol``        yes       protocol, e.g. ``linear`` / ``finetune``; never mixed with another protocol
  ``metric``          yes       metric name; becomes the record's ``primary_metric``
  ``value``           yes       the number (empty / ``nan`` = not evaluated, left out with a warning)
  ``lower_is_better`` no        ``true``/``false`` (also ``1``/``0``, ``yes``/``no``); default false
  ``num_params``      no        parameter count (e.g. ``86e6``), used for the small-backbone tier
  ``input_size``      no        input side in pixels the value was measured at (GFLOPs are computed for
                                known ``arch.tag`` names at this size, :mod:`bob_jax.costs`)
  ``gflops``          no        forward GFLOPs per image (2 x MACs), used as given
  ==================  ========  ========================================================================

  A row from a pool joins the z-score pool of every store record with the same (task, dataset, split,
  protocol, metric), so names must match what bob_jax writes for the new backbone's runs. JSON lines may
  also carry ``metrics_per_example`` (see below).
* **Cross-task Spearman correlation** (:func:`task_correlations`): for every pair of tasks, the rank
  correlation of the backbones' per-task mean z over the backbones scored in both (paper: typically > 0.8).
* **Parameter tiers** (:func:`param_counts`, :func:`small_backbones`): the paper's "small" tier is < 30 M
  parameters. Counts come from ``record["num_params"]``; :func:`count_params` computes one for a bob_jax
  backbone. Within the tier backbones keep the z-scores of the full pool (the tier filters the ranking, it
  does not re-standardise), as in the paper's small-backbone comparison.
* **Bootstrap confidence intervals** (:func:`bootstrap_ranking`): a record may carry
  ``metrics_per_example``, the per-test-example values whose mean is its primary metric (0/1 correctness
  for accuracy, reciprocal rank for MRR, AP per query for mAP). Test examples are resampled with replacement
  within each record (seeded), and each replicate recomputes the backbones' values, per-setting z-scores,
  task means, overall score and ranks exactly as :func:`bob_jax.ranking.rank_backbones` does; percentile
  intervals are reported. Records without per-example values are held at their point value in every
  replicate, and a backbone only gets an interval for a quantity when every record behind it was resampled
  (otherwise the interval would understate its uncertainty): '-' in the reports. The model (training) is not
  resampled, only the finite test set, so these intervals measure test-set noise, not seed variance.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bob_jax.ranking import Ranking, Setting, finite_primary_value, rank_backbones, record_setting

__all__ = [
    "POOL_COLUMNS",
    "POOL_OPTIONAL_COLUMNS",
    "SMALL_PARAMS",
    "BootstrapResult",
    "Correlations",
    "bootstrap_ranking",
    "count_params",
    "load_pool",
    "param_counts",
    "pool_records",
    "small_backbones",
    "spearman",
    "task_correlations",
]

POOL_COLUMNS = ("backbone", "task", "dataset", "split", "protocol", "metric", "value")
POOL_OPTIONAL_COLUMNS = ("lower_is_better", "num_params", "input_size", "gflops", "metrics_per_example")
SMALL_PARAMS = 30_000_000  # the paper's small tier: fewer than 30 M parameters

# ----------------------------------------------------------------------------------------------------------
# Pool files
# ----------------------------------------------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f", ""}


def _parse_bool(v: Any, where: str) -> bool:
    if isinstance(v, bool):
        return v
    if v is None:
        return False
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    s = str(v).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ValueError(f"{where}: lower_is_better = {v!r} is not a boolean; write true or false.")


def _parse_number(v: Any, column: str, where: str, *, allow_missing: bool) -> float | None:
    if v is None or (isinstance(v, str) and v.strip() == ""):
        if allow_missing:
            return None
        raise ValueError(f"{where}: column {column!r} is empty.")
    if isinstance(v, bool):
        raise ValueError(f"{where}: {column} = {v!r} is a boolean, not a number.")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {column} = {v!r} is not a number.") from None


def pool_records(rows: Iterable[Mapping[str, Any]], source: str = "pool") -> list[dict[str, Any]]:
    """Turn pool rows (dicts with the columns of the module docstring) into ranking records.

    Each record gets ``key`` ``"<source>#<row>"``, ``primary_metric`` = the row's metric, ``metrics`` =
    ``{metric: value}`` (NaN for an empty value, so the ranking lists and skips it) and ``source``.
    """
    out = []
    for i, row in enumerate(rows, start=1):
        where = f"{source} row {i}"
        # A null value is allowed (not evaluated, left out with a warning); a null name is not.
        missing = [c for c in POOL_COLUMNS if c not in row or (row[c] is None and c != "value")]
        if missing:
            raise ValueError(
                f"{where} lacks column(s) {missing}; a pool row needs {list(POOL_COLUMNS)} "
                f"(optional: {list(POOL_OPTIONAL_COLUMNS)})."
            )
        fields = {c: str(row[c]).strip() for c in POOL_COLUMNS if c != "value"}
        empty = [c for c, v in fields.items() if not v]
        if empty:
            raise ValueError(f"{where}: column(s) {empty} are empty.")
        value = _parse_number(row["value"], "value", where, allow_missing=True)
        rec: dict[str, Any] = {
            "key": f"{source}#{i}",
            "backbone": fields["backbone"],
            "task": fields["task"],
            "dataset": fields["dataset"],
            "split": fields["split"],
            "protocol": fields["protocol"],
            "primary_metric": fields["metric"],
            "metrics": {fields["metric"]: float("nan") if value is None else value},
            "lower_is_better": _parse_bool(row.get("lower_is_better"), where),
            "source": source,
        }
        n = _parse_number(row.get("num_params"), "num_params", where, allow_missing=True)
        if n is not None:
            if n <= 0 or n != int(n):
                raise ValueError(f"{where}: num_params = {row['num_params']!r} is not a positive integer.")
            rec["num_params"] = int(n)
        size = _parse_number(row.get("input_size"), "input_size", where, allow_missing=True)
        if size is not None:
            if size <= 0 or size != int(size):
                raise ValueError(f"{where}: input_size = {row['input_size']!r} is not a positive integer.")
            rec["input_size"] = int(size)
        gflops = _parse_number(row.get("gflops"), "gflops", where, allow_missing=True)
        if gflops is not None:
            if not (math.isfinite(gflops) and gflops > 0):
                raise ValueError(f"{where}: gflops = {row['gflops']!r} is not a positive number.")
            rec["gflops"] = gflops
        if row.get("metrics_per_example") is not None:
            rec["metrics_per_example"] = list(row["metrics_per_example"])
        out.append(rec)
    return out


def load_pool(path: str | Path) -> list[dict[str, Any]]:
    """Read a pool file (CSV, or JSON lines for ``.jsonl`` / ``.ndjson`` / ``.json``) into ranking records."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pool file {path} does not exist (give a CSV or JSON-lines file to --pool).")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            absent = [c for c in POOL_COLUMNS if c not in header]
            if absent:
                raise ValueError(
                    f"pool file {path}: header {header} lacks column(s) {absent}; the format is described "
                    "in bob_jax/analysis.py."
                )
            rows = list(reader)
    elif suffix in (".jsonl", ".ndjson", ".json"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"pool file {path} line {n} is not JSON ({e}); write one object per line.")
            if not isinstance(obj, dict):
                raise ValueError(f"pool file {path} line {n} is not a JSON object.")
            rows.append(obj)
    else:
        raise ValueError(f"pool file {path}: unknown suffix {suffix!r}; use .csv or .jsonl.")
    if not rows:
        raise ValueError(f"pool file {path} has no rows.")
    return pool_records(rows, source=str(path))


# ----------------------------------------------------------------------------------------------------------
# Parameter counts
# ----------------------------------------------------------------------------------------------------------


def count_params(model) -> int:
    """Number of trainable parameters of a bob_jax (Flax NNX) backbone: the sizes of its ``nnx.Param`` leaves.

    BatchNorm running statistics are ``nnx.BatchStat`` and are not counted, matching PyTorch's
    ``sum(p.numel() for p in model.parameters())``.
    """
    import jax
    from flax import nnx

    return int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def param_counts(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """backbone -> parameter count from ``record["num_params"]`` (records without it are ignored).

    Records of one backbone may differ (a task head counted in some): the smallest count is taken, the trunk.
    """
    out: dict[str, int] = {}
    for rec in records:
        n = rec.get("num_params")
        if n is None or isinstance(n, bool):
            continue
        if not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
            raise ValueError(f"record {rec.get('key')!r}: num_params = {n!r} is not a positive number.")
        b = str(rec["backbone"])
        out[b] = min(out.get(b, int(n)), int(n))
    return out


def small_backbones(
    ranking: Ranking, params: Mapping[str, int], threshold: int = SMALL_PARAMS
) -> list[str]:
    """Scored backbones with a known count below ``threshold``, in ranking order (full-pool z-scores)."""
    scored = [b for b in ranking.ranked if ranking.overall_z[b] is not None]
    return [b for b in scored if b in params and params[b] < threshold]


# ----------------------------------------------------------------------------------------------------------
# Spearman correlations
# ----------------------------------------------------------------------------------------------------------


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata's default)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho (Pearson correlation of average ranks); NaN with < 2 points or a constant input."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-D sequences of equal length, got {x.shape} and {y.shape}.")
    if len(x) < 2:
        return float("nan")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry / denom) if denom > 0 else float("nan")


@dataclasses.dataclass
class Correlations:
    """Cross-task Spearman correlations: ``rho[i][j]`` over ``n[i][j]`` backbones scored in both tasks."""

    tasks: list[str]
    rho: np.ndarray
    n: np.ndarray


def task_correlations(ranking: Ranking) -> Correlations:
    """Spearman correlation of per-task mean z between every pair of tasks (diagonal 1 where n >= 2).

    Tasks without any scored setting (no task z for anyone) are left out.
    """
    tasks = [t for t in ranking.tasks if any(t in tz for tz in ranking.task_z.values())]
    k = len(tasks)
    rho = np.full((k, k), np.nan)
    n = np.zeros((k, k), dtype=np.int64)
    for i, a in enumerate(tasks):
        for j, b in enumerate(tasks):
            common = [bb for bb, tz in ranking.task_z.items() if a in tz and b in tz]
            n[i, j] = len(common)
            if i == j:
                rho[i, j] = 1.0 if len(common) >= 2 else np.nan
            elif j > i:
                rho[i, j] = spearman(
                    [ranking.task_z[bb][a] for bb in common], [ranking.task_z[bb][b] for bb in common]
                )
            else:
                rho[i, j] = rho[j, i]
    return Correlations(tasks, rho, n)


# ----------------------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------------------

Interval = tuple[float, float]


@dataclasses.dataclass
class BootstrapResult:
    """Percentile intervals from :func:`bootstrap_ranking`, only where every record behind them was resampled.

    ``value`` / ``z``: setting label -> backbone -> interval; ``task_z``: backbone -> task -> interval;
    ``overall_z`` and ``rank``: backbone -> interval (rank 1 = best, among the scored backbones).
    """

    num_resamples: int
    level: float
    seed: int
    value: dict[str, dict[str, Interval]]
    z: dict[str, dict[str, Interval]]
    task_z: dict[str, dict[str, Interval]]
    overall_z: dict[str, Interval]
    rank: dict[str, Interval]
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def any(self) -> bool:
        return bool(self.value)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _per_example(rec: Mapping[str, Any], value: float, name: str) -> np.ndarray:
    """The record's finite per-example values, checked to average to its primary metric.

    Null / NaN entries are examples where the metric is undefined (a retrieval query without positives) and
    which the metric's mean leaves out, so they are dropped here too.
    """
    raw = rec["metrics_per_example"]
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence | np.ndarray):
        raise ValueError(f"{name}: metrics_per_example is not a list of numbers.")
    try:
        arr = np.asarray([np.nan if v is None else v for v in raw], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: metrics_per_example is not a list of numbers.") from None
    arr = arr[np.isfinite(arr)] if arr.ndim == 1 else arr
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name}: metrics_per_example must be a non-empty list of numbers (nulls dropped).")
    mean = float(arr.mean())
    if abs(mean - value) > 1e-6 * max(1.0, abs(value)):
        raise ValueError(
            f"{name}: the mean of metrics_per_example ({mean:.8g}) is not the primary metric ({value:.8g}); "
            "the per-example values must be on the metric's scale (e.g. 0/1 correctness for a 0-1 accuracy)."
        )
    return arr


def _resampled_means(arr: np.ndarray, num: int, rng: np.random.Generator) -> np.ndarray:
    """``num`` means of size-n resamples with replacement, in chunks so memory stays ~ 4M indices.

    Few distinct values (0/1 correctness): how often each value is drawn in a resample is multinomial with
    the observed frequencies, the same distribution as drawing n indices, at O(distinct) instead of O(n) cost
    per resample -- ImageNet-sized test sets over a whole pool stay quick.
    """
    n = arr.size
    uniq, counts = np.unique(arr, return_counts=True)
    if uniq.size <= 64:
        drawn = rng.multinomial(n, counts / n, size=num)
        return drawn @ uniq / n
    chunk = max(1, min(num, 4_000_000 // n))
    out = np.empty(num, dtype=np.float64)
    for start in range(0, num, chunk):
        stop = min(num, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = arr[idx].mean(axis=1)
    return out


def bootstrap_ranking(
    records: Iterable[Mapping[str, Any]],
    *,
    num_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    min_backbones: int = 3,
    ranking: Ranking | None = None,
    strict: bool = True,
) -> BootstrapResult:
    """Bootstrap percentile intervals for every value, z, task z, overall z and rank (module docstring).

    Which settings are scored is fixed by the point estimate (``ranking``, computed when not given); a
    replicate in which a setting has zero spread contributes no z for it. A record whose
    ``metrics_per_example`` is unusable (not numbers, or not averaging to its primary metric) raises
    ValueError, or with ``strict=False`` is treated as having none and noted in :attr:`BootstrapResult.notes`
    (the report uses this, so one odd record does not stop a battle's report).
    """
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}.")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    records = list(records)
    if ranking is None:
        ranking = rank_backbones(records, min_backbones=min_backbones)
    rng = np.random.default_rng(seed)

    # (setting, backbone) -> per-record resampled values (B,); complete: every record had per-example values.
    reps: dict[tuple[Setting, str], list[np.ndarray]] = defaultdict(list)
    complete: dict[tuple[Setting, str], bool] = {}
    notes: list[str] = []
    for i, rec in enumerate(records):
        setting = record_setting(rec, i)
        value = finite_primary_value(rec)
        if value is None:
            continue
        key = (setting, str(rec["backbone"]))
        name = f"record {rec.get('key', '#' + str(i))!s} ({rec['backbone']})"
        per_example = None
        if rec.get("metrics_per_example") is not None:
            try:
                per_example = _per_example(rec, value, name)
            except ValueError as e:
                if strict:
                    raise
                notes.append(f"{e} Held fixed (no interval).")
        if per_example is not None:
            reps[key].append(_resampled_means(per_example, num_resamples, rng))
            complete.setdefault(key, True)
        else:
            reps[key].append(np.full(num_resamples, value))
            complete[key] = False

    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)

    def interval(x: np.ndarray) -> Interval:
        x = x[np.isfinite(x)]
        if x.size == 0:
            return (float("nan"), float("nan"))
        lo, hi = np.percentile(x, q)
        return (float(lo), float(hi))

    value_ci: dict[str, dict[str, Interval]] = {}
    z_ci: dict[str, dict[str, Interval]] = {}
    task_sum: dict[tuple[str, str], np.ndarray] = {}
    task_cnt: dict[tuple[str, str], np.ndarray] = {}
    task_ok: dict[tuple[str, str], bool] = {}
    for s in ranking.settings:
        bbs = list(s.values)
        if not bbs:
            continue
        vals = np.stack([np.mean(reps[(s.setting, b)], axis=0) for b in bbs], axis=1)  # (B, nb)
        for j, b in enumerate(bbs):
            if complete[(s.setting, b)]:
                value_ci.setdefault(s.setting.label, {})[b] = interval(vals[:, j])
        if not s.scored:
            continue
        mean = vals.mean(axis=1, keepdims=True)
        std = vals.std(axis=1, ddof=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (vals - mean) / np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, np.nan)
        if s.lower_is_better:
            z = -z
        for j, b in enumerate(bbs):
            if complete[(s.setting, b)]:
                z_ci.setdefault(s.setting.label, {})[b] = interval(z[:, j])
            key = (b, s.setting.task)
            ok = np.isfinite(z[:, j])
            task_sum[key] = task_sum.get(key, 0.0) + np.where(ok, z[:, j], 0.0)
            task_cnt[key] = task_cnt.get(key, 0) + ok
            task_ok[key] = task_ok.get(key, True) and complete[(s.setting, b)]

    task_ci: dict[str, dict[str, Interval]] = {}
    scored = [b for b in ranking.ranked if ranking.overall_z[b] is not None]
    overall = np.full((num_resamples, len(scored)), np.nan)
    overall_ok = {}
    for j, b in enumerate(scored):
        tzs = []
        ok_all = True
        for t in ranking.task_z[b]:
            with np.errstate(divide="ignore", invalid="ignore"):
                tz = task_sum[(b, t)] / task_cnt[(b, t)]
            tzs.append(tz)
            ok_all &= task_ok[(b, t)]
            if task_ok[(b, t)]:
                task_ci.setdefault(b, {})[t] = interval(tz)
        if tzs:
            # Mean over the tasks with a z in this replicate (NaN only if none has: a zero-spread draw).
            stacked = np.stack(tzs, axis=1)
            ok = np.isfinite(stacked)
            with np.errstate(divide="ignore", invalid="ignore"):
                overall[:, j] = np.where(ok, stacked, 0.0).sum(axis=1) / ok.sum(axis=1)
        overall_ok[b] = ok_all

    overall_ci: dict[str, Interval] = {}
    rank_ci: dict[str, Interval] = {}
    if scored:
        # Rank within each replicate, best first (ties by name order, as the point ranking).
        filled = np.where(np.isfinite(overall), overall, -np.inf)
        order = np.argsort(-filled, axis=1, kind="stable")
        ranks = np.empty_like(order)
        positions = np.broadcast_to(np.arange(1, len(scored) + 1), order.shape)
        np.put_along_axis(ranks, order, positions, axis=1)
        for j, b in enumerate(scored):
            if overall_ok[b]:
                overall_ci[b] = interval(overall[:, j])
                rank_ci[b] = interval(ranks[:, j].astype(np.float64))
    return BootstrapResult(
        num_resamples=num_resamples,
        level=level,
        seed=seed,
        value=value_ci,
        z=z_ci,
        task_z=task_ci,
        overall_z=overall_ci,
        rank=rank_ci,
        notes=notes,
    )
