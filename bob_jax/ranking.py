"""Backbone ranking by per-setting z-scores, the Battle of the Backbones method (bob-spec.md section 4).

* A **setting** is (task, dataset, split, protocol, metric). Protocols are never mixed: linear probing and
  fine-tuning on the same dataset are two settings, and so are two metrics.
* Each record names its task's primary metric (``record["primary_metric"]``, a key of ``record["metrics"]``);
  higher is better unless ``record["lower_is_better"]`` is true, in which case the z-score is negated so
  that a larger z is always better.
* Within a setting every backbone's value is standardised with the mean and the **population** standard
  deviation (ddof=0) over the backbones evaluated there: ``z = (x - mean) / std``. A setting with fewer than
  ``min_backbones`` (3) backbones or zero spread is reported but not scored (z would be meaningless).
* A backbone's task score is the mean z over the scored settings of that task where it was evaluated (equal
  weight per setting); its overall score is the mean over the tasks where it has a task score (equal weight
  per task). The paper does not publish its weights; this default is stated in every report.
* Ranked by overall z, descending; ties (to 12 decimals) broken by backbone name. Backbones without any
  scored setting are listed last, by name.

Several records for the same backbone and setting (e.g. seeds) are averaged before z-scoring; the count is
kept in :attr:`SettingScores.num_records`. Because averages are taken over the settings a backbone has, a
backbone evaluated on fewer settings is compared on a different basis: :attr:`Ranking.num_settings` reports
the coverage so the report can show it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = ["Ranking", "Setting", "SettingScores", "finite_primary_value", "rank_backbones", "record_setting"]

_log = logging.getLogger(__name__)

_RECORD_FIELDS = ("backbone", "task", "dataset", "split", "protocol", "metrics", "primary_metric")


@dataclasses.dataclass(frozen=True, order=True)
class Setting:
    """One z-score pool: (task, dataset, split, protocol, metric)."""

    task: str
    dataset: str
    split: str
    protocol: str
    metric: str

    @property
    def label(self) -> str:
        """Compact name, ``task/dataset/split/protocol:metric``."""
        return f"{self.task}/{self.dataset}/{self.split}/{self.protocol}:{self.metric}"


@dataclasses.dataclass
class SettingScores:
    """Raw values and z-scores of one setting.

    ``values``: backbone -> raw primary metric (mean over that backbone's records); ``z``: backbone -> z-score
    (empty when the setting is not scored; sign already flipped for lower-is-better metrics); ``mean`` /
    ``std``: the pool's mean and population std; ``reason``: why the setting is not scored, else None.
    """

    setting: Setting
    lower_is_better: bool
    values: dict[str, float]
    num_records: dict[str, int]
    z: dict[str, float]
    mean: float
    std: float
    scored: bool
    reason: str | None


@dataclasses.dataclass
class Ranking:
    """Result of :func:`rank_backbones`.

    ``settings``: every setting, sorted; ``tasks``: task names, sorted; ``task_z``: backbone -> task -> mean z
    (only tasks with a scored setting for that backbone); ``overall_z``: backbone -> mean of its task z (None
    without any scored setting); ``num_settings``: backbone -> number of scored settings it appears in;
    ``ranked``: backbones best first; ``skipped``: messages about records left out (e.g. a NaN metric).
    """

    settings: list[SettingScores]
    tasks: list[str]
    task_z: dict[str, dict[str, float]]
    overall_z: dict[str, float | None]
    num_settings: dict[str, int]
    ranked: list[str]
    skipped: list[str]
    min_backbones: int

    @property
    def scored_settings(self) -> list[SettingScores]:
        return [s for s in self.settings if s.scored]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict (settings keyed by their label)."""
        return {
            "ranked": list(self.ranked),
            "overall_z": dict(self.overall_z),
            "task_z": {b: dict(t) for b, t in self.task_z.items()},
            "num_settings": dict(self.num_settings),
            "tasks": list(self.tasks),
            "min_backbones": self.min_backbones,
            "skipped": list(self.skipped),
            "settings": {
                s.setting.label: {
                    **dataclasses.asdict(s.setting),
                    "lower_is_better": s.lower_is_better,
                    "values": dict(s.values),
                    "num_records": dict(s.num_records),
                    "z": dict(s.z),
                    "mean": s.mean,
                    "std": s.std,
                    "scored": s.scored,
                    "reason": s.reason,
                }
                for s in self.settings
            },
        }


def _record_name(rec: Mapping[str, Any], i: int) -> str:
    return f"record {rec.get('key', '#' + str(i))!s} ({rec.get('backbone', '?')})"


def record_setting(rec: Mapping[str, Any], i: int = 0) -> Setting:
    """The setting a record belongs to; ValueError for a record lacking a field the ranking needs."""
    name = _record_name(rec, i)
    missing = [f for f in _RECORD_FIELDS if f not in rec]
    if missing:
        raise ValueError(
            f"{name} lacks field(s) {missing} needed for ranking; the task that wrote it must set "
            "them (primary_metric names the metric in record['metrics'] to rank by)."
        )
    metric = rec["primary_metric"]
    if metric not in rec["metrics"]:
        raise ValueError(
            f"{name}: primary_metric {metric!r} is not among its metrics {sorted(rec['metrics'])}."
        )
    fields = (rec["task"], rec["dataset"], rec["split"], rec["protocol"], metric)
    return Setting(*(str(f) for f in fields))


def finite_primary_value(rec: Mapping[str, Any]) -> float | None:
    """The record's primary metric as a float, or None when it is null / NaN / inf / not a number."""
    value = rec["metrics"][rec["primary_metric"]]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return None
    return float(value)


def rank_backbones(records: Iterable[Mapping[str, Any]], *, min_backbones: int = 3) -> Ranking:
    """Rank backbones from result records (see the module docstring for the method).

    Raises ValueError for a record lacking a needed field or whose ``primary_metric`` is not in its
    ``metrics``, and for a setting whose records disagree on ``lower_is_better``. Records whose primary value
    is null / NaN / inf are skipped with a warning (listed in :attr:`Ranking.skipped`).
    """
    if min_backbones < 2:
        raise ValueError(f"min_backbones must be >= 2 (a z-score needs a spread), got {min_backbones}.")
    raw: dict[Setting, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    direction: dict[Setting, tuple[bool, str]] = {}
    skipped: list[str] = []
    backbones: set[str] = set()

    for i, rec in enumerate(records):
        name = _record_name(rec, i)
        setting = record_setting(rec, i)
        lower = bool(rec.get("lower_is_better", False))
        if setting in direction and direction[setting][0] != lower:
            raise ValueError(
                f"records disagree on lower_is_better for setting {setting.label}: {name} says "
                f"{lower}, {direction[setting][1]} says {direction[setting][0]}."
            )
        direction.setdefault(setting, (lower, name))
        backbone = str(rec["backbone"])
        backbones.add(backbone)
        value = finite_primary_value(rec)
        if value is None:
            raw_value = rec["metrics"][setting.metric]
            msg = f"{name}: {setting.label} = {raw_value!r} is not a finite number; left out of the ranking"
            _log.warning(msg)
            skipped.append(msg)
            continue
        raw[setting][backbone].append(value)

    settings: list[SettingScores] = []
    for setting in sorted(direction):
        lower = direction[setting][0]
        per_bb = raw.get(setting, {})
        values = {b: float(np.mean(v)) for b, v in sorted(per_bb.items())}
        counts = {b: len(v) for b, v in sorted(per_bb.items())}
        arr = np.asarray(list(values.values()), dtype=np.float64)
        mean = float(arr.mean()) if arr.size else float("nan")
        std = float(arr.std(ddof=0)) if arr.size else float("nan")
        reason = None
        if arr.size < min_backbones:
            reason = f"only {arr.size} backbone(s), need >= {min_backbones}"
        elif std <= 1e-12 * max(1.0, abs(mean)):
            reason = "zero spread (all backbones score the same)"
            std = 0.0
        z = {}
        if reason is None:
            sign = -1.0 if lower else 1.0
            z = {b: sign * (v - mean) / std for b, v in values.items()}
        settings.append(SettingScores(setting, lower, values, counts, z, mean, std, reason is None, reason))

    by_task: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in settings:
        for b, zb in s.z.items():
            by_task[s.setting.task][b].append(zb)
    tasks = sorted({s.setting.task for s in settings})
    task_z: dict[str, dict[str, float]] = {b: {} for b in sorted(backbones)}
    num_settings = {b: 0 for b in sorted(backbones)}
    for task in tasks:
        for b, zs in by_task.get(task, {}).items():
            task_z[b][task] = float(np.mean(zs))
            num_settings[b] += len(zs)
    overall = {b: (float(np.mean(list(t.values()))) if t else None) for b, t in task_z.items()}

    scored = sorted((b for b in overall if overall[b] is not None), key=lambda b: (-round(overall[b], 12), b))
    unscored = sorted(b for b in overall if overall[b] is None)
    return Ranking(
        settings=settings,
        tasks=tasks,
        task_z=task_z,
        overall_z=overall,
        num_settings=num_settings,
        ranked=scored + unscored,
        skipped=skipped,
        min_backbones=min_backbones,
    )
