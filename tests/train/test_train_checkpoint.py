"""Checkpointer round trips (sharded pytree + data-iterator state + metadata) and MetricsWriter."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from bob_jax import parallel
from bob_jax.checkpoint import Checkpointer, abstract_like
from bob_jax.metrics_log import MetricsWriter, read_metrics
from bob_jax.tasks.linear_probe import (
    EpochBatchIndices,
    LinearProbeHead,
    PrefetchStepIterator,
    StepBatches,
    init_train_state,
    make_train_dataset,
    train_iterator,
)
from bob_jax.train import mae_lars


def _state(mesh, seed):
    head = LinearProbeHead(16, 5, rngs=nnx.Rngs(seed))
    _, state = init_train_state(head, mae_lars(0.1))
    # Non-trivial optimiser state and counters, so a restore of zeros/defaults would be caught.
    state["opt_state"] = jax.tree.map(
        lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x + 3, state["opt_state"]
    )
    state["step"] = jnp.int32(17 + seed)
    state = jax.device_put(state, parallel.replicated(mesh))
    # One array sharded over the data axis, to check restores land on the requested sharding.
    state["sharded"] = jax.device_put(
        jnp.arange(32.0).reshape(8, 4) + seed, NamedSharding(mesh, PartitionSpec("data"))
    )
    return state


def _assert_trees_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_with_shardings_data_state_and_metadata(tmp_path):
    mesh = parallel.make_mesh()
    state = _state(mesh, 0)
    with Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None
        ckpt.save(10, state, {"next_index": 10}, {"config": {"lr": 0.1}})
        ckpt.save(20, _state(mesh, 1), b"\x00\x01grain-bytes\xff", {"config": {"lr": 0.2}})
        ckpt.save(30, _state(mesh, 2), None, {})
        ckpt.wait()
        assert ckpt.all_steps() == [20, 30]  # max_to_keep=2
        assert ckpt.latest_step() == 30

    # A fresh manager (as after a restart) restores onto the abstract target's shardings.
    ckpt = Checkpointer(tmp_path / "ckpt")
    target = abstract_like(_state(mesh, 1))
    restored, data_state = ckpt.restore(20, target)
    _assert_trees_identical(restored, _state(mesh, 1))
    assert data_state == b"\x00\x01grain-bytes\xff"
    assert isinstance(restored["params"], nnx.State)
    assert restored["sharded"].sharding.spec == PartitionSpec("data")
    assert restored["params"]["fc"]["kernel"][...].sharding.spec == PartitionSpec()
    _, data_state = ckpt.restore(None, abstract_like(_state(mesh, 2)))
    assert data_state is None
    meta = ckpt.metadata(20)
    assert meta["config"] == {"lr": 0.2} and meta["step"] == 20 and "jax" in meta["versions"]
    with pytest.raises(FileNotFoundError, match="step 10 not found"):
        ckpt.restore(10, target)
    ckpt.close()


def test_restore_onto_a_different_mesh(tmp_path):
    mesh8 = parallel.make_mesh()
    state = _state(mesh8, 0)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {"next_index": 1}, {})
    mesh1 = parallel.make_mesh(devices=jax.devices()[:1])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(mesh1)), state
    )
    with Checkpointer(tmp_path) as ckpt:
        restored, data_state = ckpt.restore(1, target)
    _assert_trees_identical(restored, state)
    assert restored["sharded"].sharding.mesh.devices.size == 1
    assert data_state == {"next_index": 1}


def test_grain_iterator_state_round_trip_resumes_exact_batches(tmp_path):
    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(50, 4)).astype(np.float32), rng.integers(0, 3, 50)
    ds = make_train_dataset(feats, labels, batch_size=8, epochs=3, seed=5)
    assert len(ds) == 3 * 6
    it = iter(ds.to_iter_dataset())
    for _ in range(7):  # into the second epoch
        next(it)
    data_state = it.get_state()
    expected = [next(it) for _ in range(4)]
    mesh = parallel.make_mesh()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(7, _state(mesh, 0), data_state, {})
    with Checkpointer(tmp_path) as ckpt:
        _, restored_data_state = ckpt.restore(7, abstract_like(_state(mesh, 0)))
    assert restored_data_state == data_state
    it2 = iter(make_train_dataset(feats, labels, batch_size=8, epochs=3, seed=5).to_iter_dataset())
    it2.set_state(restored_data_state)
    for want in expected:
        got = next(it2)
        np.testing.assert_array_equal(got["inputs"], want["inputs"])
        np.testing.assert_array_equal(got["labels"], want["labels"])
    # Epochs are permutations (no example repeated within an epoch, drop_last) and differ between epochs.
    sampler = EpochBatchIndices(50, 8, seed=5)
    epoch0 = np.concatenate([sampler(k) for k in range(6)])
    epoch1 = np.concatenate([sampler(k) for k in range(6, 12)])
    assert len(set(epoch0.tolist())) == 48 and len(set(epoch1.tolist())) == 48
    assert not np.array_equal(epoch0, epoch1)


def test_metrics_writer_appends_json_lines(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write(
            1, {"loss": jnp.float32(0.5), "acc": np.float64(0.25), "vec": np.arange(2), "bad": float("nan")}
        )
    with MetricsWriter(tmp_path) as w:  # a resumed run appends
        w.write(2, {"loss": 0.25})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == 0.5 and records[0]["acc"] == 0.25 and records[0]["vec"] == [0, 1]
    assert records[0]["bad"] == "nan" and records[1]["time"] >= records[0]["time"]
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        assert all(json.loads(line) for line in f)


def test_fallback_iterator_matches_grain_iterator():
    rng = np.random.default_rng(1)
    feats, labels = rng.normal(size=(40, 3)).astype(np.float32), rng.integers(0, 4, 40)
    batches = StepBatches(feats, labels, batch_size=8, epochs=2, seed=3)
    grain_it = train_iterator(batches, use_grain=True)
    own_it = train_iterator(batches, use_grain=False)
    assert isinstance(own_it, PrefetchStepIterator)
    for _ in range(3):
        a, b = next(grain_it), next(own_it)
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert grain_it.get_state() == own_it.get_state() == {"next_index": 3}
    # Resuming either iterator from the other's state continues identically, to the end.
    rest_grain = list(train_iterator(batches, own_it.get_state(), use_grain=True))
    rest_own = list(train_iterator(batches, grain_it.get_state(), use_grain=False))
    assert len(rest_grain) == len(rest_own) == 10 - 3
    for a, b in zip(rest_grain, rest_own, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    own_it.close()
