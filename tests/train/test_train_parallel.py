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


def test_mesh_and_sharding_rules_flags_reach_run_finetune(tmp_path, monkeypatch):
    """`--config.mesh=data=2,fsdp=4 --config.sharding_rules=...` through the job (battle -> trained.run)
    to `run_finetune`, whose placement shards the model by those rules (the training itself on such
    meshes: tests/train/test_fsdp.py)."""
    import pathlib

    from absl import flags
    from flax import nnx
    from ml_collections import config_flags

    from bob_jax import battle
    from bob_jax.tasks import finetune

    root = pathlib.Path(__file__).resolve().parents[2]
    argv = ["main", f"--config={root}/configs/tasks/finetune.py:backbones=tf_efficientnet_lite0.offline@random,"
                    "dataset=digits,train_size=64,test_size=40,input_size=32",
            "--config.mesh=data=2,fsdp=4",
            # Inside the quoted tuple a "\." would be a Python string escape: "." or "[.]" instead.
            "--config.sharding_rules=('conv_head[.]kernel=None,None,None,fsdp', '.*=replicate')",
            "--config.progress=False"]
    fv = flags.FlagValues()  # as bob_jax.main defines it; overrides are read from argv
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    assert fv.config.sharding_rules == ("conv_head[.]kernel=None,None,None,fsdp", ".*=replicate")

    class Placed(Exception):
        pass

    def placement_only(model, train, test, *, num_classes, config, mesh, sharding_rules, **kwargs):
        model.train()
        _, params, rest = nnx.split(model, nnx.Param, ...)
        tx = finetune.adamw_layer_decay(1e-3, weight_decay=0.05, lr_scales=jax.tree.map(lambda _: 1.0, params),
                                        decay_mask=finetune.weight_decay_mask(params))
        (params, _, opt_state), _ = finetune.place_state(params, rest, tx, mesh, sharding_rules)
        raise Placed(dict(mesh.shape), params["conv_head"]["kernel"].get_value(),
                     opt_state[0].mu["conv_head"]["kernel"].get_value(), params["classifier"]["kernel"].get_value())

    monkeypatch.setattr(finetune, "run_finetune", placement_only)
    with pytest.raises(Placed) as placed:
        battle.run(fv.config, tmp_path, report=False)
    shape, kernel, moment, head = placed.value.args
    assert shape == {"data": 2, "fsdp": 4}
    assert kernel.shape == moment.shape == (1, 1, 320, 1280)
    assert {s.data.shape for s in kernel.addressable_shards} == {(1, 1, 320, 320)}
    assert {s.data.shape for s in moment.addressable_shards} == {(1, 1, 320, 320)}
    assert kernel.sharding.spec == PartitionSpec(None, None, None, "fsdp")
    assert head.sharding.spec == PartitionSpec()  # '.*=replicate'


def test_shard_global_batch_feeds_each_device_its_rows():
    """Every process holds the whole batch; each device gets the rows `shard_batch` would give it."""
    mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
    batch = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "y": np.arange(16, dtype=np.int32)}
    ours, theirs = parallel.shard_global_batch(batch, mesh), parallel.shard_batch(batch, mesh)
    for key in batch:
        assert ours[key].sharding == theirs[key].sharding
        for a, b in zip(ours[key].addressable_shards, theirs[key].addressable_shards, strict=True):
            assert a.index == b.index
            np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    with pytest.raises(ValueError, match="not divisible by the 8 data shards"):
        parallel.shard_global_batch({"x": np.zeros((12, 2))}, mesh)
    with pytest.raises(ValueError, match="same leading"):
        parallel.shard_global_batch({"x": np.zeros((8, 2)), "y": np.zeros(16)}, mesh)
