"""Tests for bob_jax.ranking: per-setting z-scores (population std), task and overall averaging."""

import math

import numpy as np
import pytest

from bob_jax.ranking import Setting, rank_backbones

Z3 = math.sqrt(1.5)  # z of the extremes of (1, 2, 3): (3 - 2) / sqrt(2/3) = 1.2247


def rec(backbone, value, task="cls", dataset="d1", split="test", protocol="linear", metric="top1", **extra):
    return {
        "key": f"{backbone}-{task}-{dataset}-{protocol}",
        "backbone": backbone,
        "task": task,
        "dataset": dataset,
        "split": split,
        "protocol": protocol,
        "metrics": {metric: value, "other": 0.0},
        "primary_metric": metric,
        **extra,
    }


def test_three_values_population_z():
    r = rank_backbones([rec("a", 1.0), rec("b", 2.0), rec("c", 3.0)])
    (s,) = r.settings
    assert s.scored and s.reason is None
    assert s.setting == Setting("cls", "d1", "test", "linear", "top1")
    assert s.mean == pytest.approx(2.0) and s.std == pytest.approx(math.sqrt(2 / 3))
    assert s.z == pytest.approx({"a": -Z3, "b": 0.0, "c": Z3})
    assert Z3 == pytest.approx(1.2247, abs=1e-4)
    assert r.ranked == ["c", "b", "a"]
    assert r.overall_z == pytest.approx({"a": -Z3, "b": 0.0, "c": Z3})


def test_fewer_than_three_and_zero_spread_not_scored():
    r = rank_backbones(
        [
            rec("a", 1.0, dataset="two"),
            rec("b", 2.0, dataset="two"),
            rec("a", 0.5, dataset="flat"),
            rec("b", 0.5, dataset="flat"),
            rec("c", 0.5, dataset="flat"),
        ]
    )
    by = {s.setting.dataset: s for s in r.settings}
    assert not by["two"].scored and "only 2 backbone" in by["two"].reason
    assert by["two"].values == {"a": 1.0, "b": 2.0}  # still reported
    assert not by["flat"].scored and "zero spread" in by["flat"].reason
    assert all(v is None for v in r.overall_z.values())
    assert r.ranked == ["a", "b", "c"]  # nothing scored: by name
    assert r.scored_settings == []


def test_lower_is_better_negates():
    r = rank_backbones(
        [
            rec("a", 10.0, metric="err", lower_is_better=True),
            rec("b", 20.0, metric="err", lower_is_better=True),
            rec("c", 30.0, metric="err", lower_is_better=True),
        ]
    )
    assert r.settings[0].z == pytest.approx({"a": Z3, "b": 0.0, "c": -Z3})
    assert r.ranked == ["a", "b", "c"]


def test_multiple_tasks_equal_weights_hand_computed():
    records = [
        # task A, two settings
        rec("x", 1.0, task="A", dataset="s1"),
        rec("y", 2.0, task="A", dataset="s1"),
        rec("z", 3.0, task="A", dataset="s1"),
        rec("x", 1.0, task="A", dataset="s2"),
        rec("y", 3.0, task="A", dataset="s2"),
        rec("z", 2.0, task="A", dataset="s2"),
        # task B, one setting: mean 30, deviations -20, -10, 30, population std sqrt(1400/3)
        rec("x", 10.0, task="B", dataset="s3"),
        rec("y", 20.0, task="B", dataset="s3"),
        rec("z", 60.0, task="B", dataset="s3"),
        # task C: a setting with only two backbones (not scored); w appears nowhere else
        rec("x", 5.0, task="C", dataset="s4"),
        rec("w", 6.0, task="C", dataset="s4"),
    ]
    r = rank_backbones(records)
    sd = math.sqrt(1400 / 3)
    zb = {"x": -20 / sd, "y": -10 / sd, "z": 30 / sd}
    assert zb["x"] == pytest.approx(-0.9258, abs=1e-4) and zb["z"] == pytest.approx(1.3887, abs=1e-4)
    za = {"x": (-Z3 - Z3) / 2, "y": (0 + Z3) / 2, "z": (Z3 + 0) / 2}
    for b in "xyz":
        assert r.task_z[b]["A"] == pytest.approx(za[b])
        assert r.task_z[b]["B"] == pytest.approx(zb[b])
        assert "C" not in r.task_z[b]
        assert r.overall_z[b] == pytest.approx((za[b] + zb[b]) / 2)
    assert r.overall_z["z"] == pytest.approx(1.00055, abs=1e-4)
    assert r.overall_z["w"] is None and r.task_z["w"] == {}
    assert r.ranked == ["z", "y", "x", "w"]
    assert r.tasks == ["A", "B", "C"]
    assert r.num_settings == {"w": 0, "x": 3, "y": 3, "z": 3}


def test_protocols_never_mixed_and_ties_by_name():
    records = [rec(b, v, protocol="linear") for b, v in zip("abc", (1.0, 2.0, 3.0), strict=True)]
    records += [rec(b, v, protocol="finetune") for b, v in zip("abc", (3.0, 2.0, 1.0), strict=True)]
    r = rank_backbones(records)
    assert len(r.settings) == 2 and {s.setting.protocol for s in r.settings} == {"linear", "finetune"}
    # a and c tie at 0 overall, as does b: order by name
    assert r.overall_z == pytest.approx({"a": 0.0, "b": 0.0, "c": 0.0})
    assert r.ranked == ["a", "b", "c"]


def test_duplicate_records_are_averaged_and_nan_skipped(caplog):
    records = [
        rec("a", 1.0),
        rec("a", 3.0),
        rec("b", 4.0),
        rec("c", 6.0),
        rec("d", float("nan")),
        rec("d", None),
    ]
    r = rank_backbones(records)
    s = r.settings[0]
    assert s.values == {"a": 2.0, "b": 4.0, "c": 6.0}
    assert s.num_records == {"a": 2, "b": 1, "c": 1}
    assert len(r.skipped) == 2 and "not a finite number" in r.skipped[0]
    assert r.ranked[-1] == "d" and r.overall_z["d"] is None
    d = r.as_dict()
    assert d["settings"][s.setting.label]["z"]["c"] == pytest.approx(Z3)
    assert d["ranked"] == r.ranked


def test_errors():
    bad = rec("a", 1.0)
    del bad["primary_metric"]
    with pytest.raises(ValueError, match="primary_metric"):
        rank_backbones([bad])
    with pytest.raises(ValueError, match="'top5' is not among its metrics"):
        rank_backbones([rec("a", 1.0) | {"primary_metric": "top5"}])
    with pytest.raises(ValueError, match="disagree on lower_is_better"):
        rank_backbones([rec("a", 1.0), rec("b", 2.0, lower_is_better=True)])
    with pytest.raises(ValueError, match="min_backbones"):
        rank_backbones([], min_backbones=1)
    empty = rank_backbones([])
    assert empty.ranked == [] and empty.settings == []


def test_min_backbones_two():
    r = rank_backbones([rec("a", 1.0), rec("b", 3.0)], min_backbones=2)
    assert r.settings[0].z == pytest.approx({"a": -1.0, "b": 1.0})
    assert np.isclose(r.overall_z["b"], 1.0)
