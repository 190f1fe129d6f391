"""Tests for bob_jax.results: run keys, atomic one-file-per-record store, provenance."""

import json
import logging
import os

import numpy as np
import pytest

from bob_jax import results
from bob_jax.results import ResultsStore, run_key

KEY_ARGS = dict(
    backbone="resnet50.a1_in1k",
    weights_sha256="ab" * 32,
    task="knn",
    dataset="imagenet2012",
    split="validation",
    protocol="knn_k20_t0.07",
    seed=0,
    hparams={"k": 20, "temperature": 0.07},
)


def _record(**over):
    rec = dict(KEY_ARGS, key=run_key(**KEY_ARGS), metrics={"top1": 0.75}, primary_metric="top1")
    rec.update(over)
    return rec


def test_run_key_canonical():
    key = run_key(**KEY_ARGS)
    assert len(key) == 16 and int(key, 16) >= 0
    # dict order and numpy scalar types do not matter
    same = dict(KEY_ARGS, hparams={"temperature": np.float64(0.07), "k": np.int64(20)}, seed=np.int32(0))
    assert run_key(**same) == key
    for field, value in [
        ("backbone", "resnet50.tv_in1k"),
        ("weights_sha256", "cd" * 32),
        ("task", "linear"),
        ("dataset", "cifar100"),
        ("split", "test"),
        ("protocol", "other"),
        ("seed", 1),
        ("hparams", {"k": 10, "temperature": 0.07}),
    ]:
        assert run_key(**dict(KEY_ARGS, **{field: value})) != key, field


def test_write_read_roundtrip_and_exists(tmp_path):
    store = ResultsStore(tmp_path)
    rec = _record(metrics={"top1": np.float32(0.5), "nll": float("nan"), "per_class": np.arange(3)})
    assert not store.exists(rec["key"])
    path = store.write(rec)
    assert path == tmp_path / "results" / f"{rec['key']}.json" == store.path(rec["key"])
    assert store.exists(rec["key"])
    back = store.read(rec["key"])
    assert back["metrics"] == {"top1": 0.5, "nll": None, "per_class": [0, 1, 2]}
    assert back["backbone"] == rec["backbone"] and "written_at" in back
    json.loads(path.read_text())  # strict JSON (no NaN literal)
    assert "NaN" not in path.read_text()
    # no temp files left behind
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [f"{rec['key']}.json"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_write_validation(tmp_path):
    store = ResultsStore(tmp_path)
    with pytest.raises(ValueError, match=r"\['split', 'metrics'\]"):
        store.write({"key": "k1", "backbone": "b", "task": "t", "dataset": "d", "protocol": "p"})
    with pytest.raises(ValueError, match="does not match run_key"):
        store.write(_record(key="0123456789abcdef"))
    with pytest.raises(ValueError, match="must be a dict"):
        store.write(_record(metrics=[1, 2]))
    with pytest.raises(ValueError, match="invalid result key"):
        store.write(
            {
                "key": "../escape",
                "backbone": "b",
                "task": "t",
                "dataset": "d",
                "split": "s",
                "protocol": "p",
                "metrics": {},
            }
        )
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        store.write(_record(metrics={"x": object()}))
    rec = _record()
    store.write(rec)
    store.write(dict(rec, metrics={"top1": 0.8}))  # overwrite by default
    assert store.read(rec["key"])["metrics"]["top1"] == 0.8
    with pytest.raises(FileExistsError):
        store.write(rec, overwrite=False)
    with pytest.raises(FileNotFoundError, match="finished"):
        store.read("feedfeedfeedfeed")


def test_records_sorted_and_skips_unreadable(tmp_path, caplog):
    store = ResultsStore(tmp_path)
    assert store.records() == []  # no results directory yet
    keys = []
    for seed in (3, 1, 2):
        args = dict(KEY_ARGS, seed=seed)
        keys.append(run_key(**args))
        store.write(dict(args, key=keys[-1], metrics={"top1": seed / 10}))
    (store.root / "broken.json").write_text("{not json")
    (store.root / "partial.json").write_text(json.dumps({"key": "partial"}))
    (store.root / ".abc.json.123.tmp").write_text("{")  # in-flight temp file of another writer
    with caplog.at_level(logging.WARNING):
        recs = store.records()
    assert [r["key"] for r in recs] == sorted(keys)
    assert "broken.json" in caplog.text and "partial.json" in caplog.text and "missing field" in caplog.text


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out" / "f.txt"
    results.atomic_write_text(target, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        results.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


def test_environment_info(tmp_path):
    info = results.environment_info()
    assert set(info["packages"]) >= {
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "orbax-checkpoint",
        "grain",
        "numpy",
        "python",
    }
    assert info["packages"]["numpy"] == np.__version__
    assert info["device_kind"] and info["platform"] == "cpu" and info["hostname"]
    assert info["git_commit"] is None or len(info["git_commit"]) == 40
    assert isinstance(info["git_dirty"], (bool, type(None)))
    json.dumps(info)
    assert results._git(["rev-parse", "HEAD"], tmp_path) is None  # not a git checkout -> None
