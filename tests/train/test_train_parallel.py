"""Meshes and global batches on the 8 simulated CPU devices of conftest."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from bob_jax import parallel


def test_make_mesh_shapes():
    assert len(jax.devices()) == 8
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.shape["data"] == 8
    mesh = parallel.make_mesh({"data": 4, "model": 2})
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    mesh = parallel.make_mesh({"data": -1, "model": 2})
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    one = parallel.make_mesh(devices=jax.devices()[:1])
    assert one.shape["data"] == 1 and one.devices.ravel()[0] == jax.devices()[0]


def test_make_mesh_errors_name_the_device_count():
    with pytest.raises(ValueError, match="8 devices"):
        parallel.make_mesh({"data": 3})
    with pytest.raises(ValueError, match="8 available devices"):
        parallel.make_mesh({"data": -1, "model": 3})
    with pytest.raises(ValueError, match="only one axis"):
        parallel.make_mesh({"data": -1, "model": -1})
    with pytest.raises(ValueError, match="positive"):
        parallel.make_mesh({"data": 0})


def test_shard_batch_places_rows_on_data_shards():
    mesh = parallel.make_mesh({"data": 4, "model": 2})
    batch = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "y": np.arange(8, dtype=np.int32)}
    out = parallel.shard_batch(batch, mesh)
    for key in batch:
        assert out[key].shape == batch[key].shape
        assert out[key].sharding.spec == PartitionSpec("data")
        np.testing.assert_array_equal(np.asarray(out[key]), batch[key])
    # Each data shard holds 2 consecutive rows, replicated over the model axis.
    rows = sorted({(s.index[0].start, s.index[0].stop) for s in out["x"].addressable_shards})
    assert rows == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert parallel.replicated(mesh).spec == PartitionSpec()


def test_shard_batch_rejects_indivisible_and_ragged_batches():
    mesh = parallel.make_mesh()
    with pytest.raises(ValueError, match="not divisible by the 8 data shards"):
        parallel.shard_batch({"x": np.zeros((12, 2))}, mesh)
    with pytest.raises(ValueError, match="leading dimension"):
        parallel.shard_batch({"x": np.zeros((8, 2)), "y": np.zeros(16)}, mesh)
