"""Eval padding/mask and order, sharding, train shuffling/epochs, exact resume, multi-worker equality.

Multi-worker loaders start spawned processes (each imports grain and jax, ~2-3 s on 2 cores), so only two
tests use them (three pools): eval over the tiny tfds build and train over sklearn digits.
"""

import json
import threading

import numpy as np
import pytest

from bob_jax.backbones.preprocess import Preprocess
from bob_jax.data import pipelines as P
from bob_jax.data import sources as S
from bob_jax.data import transforms as T

PP = Preprocess(input_size=16, crop_pct=0.875, interpolation="bicubic")  # 8x8 digits -> resize 18 -> crop 16


@pytest.fixture(scope="module")
def digits_test():
    return S.Digits("test")


def _within_deadline(fn, seconds: float = 300.0):
    """Run `fn` in a thread; fail (instead of stalling the suite) if a multi-worker loader never answers.

    Worker start-up normally takes a few seconds; the generous limit covers heavily loaded machines.
    """
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # re-raised in the test thread
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"grain multi-worker loader produced nothing within {seconds:.0f} s (hung worker?)")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _equal_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
            assert x[k].dtype == y[k].dtype


def test_eval_batches_padding_mask_order(digits_test):
    batches = list(P.eval_batches(digits_test, T.EvalTransform(PP), 64))
    assert len(batches) == P.num_eval_batches(360, 64) == 6
    for b in batches:
        assert b["image"].shape == (64, 16, 16, 3) and b["image"].dtype == np.uint8
        assert b["label"].dtype == np.int32 and b["index"].dtype == np.int64 and b["mask"].dtype == bool
        assert all(v.shape[0] == 64 for v in b.values())
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 360 and mask[:360].all() and not mask[360:].any()
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(index[:360], np.arange(360))  # every example once, in order
    last = batches[-1]
    assert (
        (last["label"][40:] == -1).all()
        and (last["index"][40:] == -1).all()
        and (last["image"][40:] == 0).all()
    )
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:360], digits_test.labels())
    eval_tf = T.EvalTransform(PP)
    for i in (0, 200, 359):
        b, j = divmod(i, 64)
        np.testing.assert_array_equal(batches[b]["image"][j], eval_tf.map(digits_test[i]["image"]))


def test_eval_batches_exact_multiple_no_transform(digits_test):
    sub = S.Subset(digits_test, np.arange(96))
    batches = list(P.eval_batches(sub, None, 32))  # images already share one shape: no transform needed
    assert len(batches) == 3 and all(b["mask"].all() for b in batches)
    assert batches[0]["image"].shape == (32, 8, 8)
    assert list(P.eval_batches(S.Subset(digits_test, []), None, 8)) == []


def test_eval_batches_shards(digits_test):
    sub = S.Subset(digits_test, np.arange(101))
    per_shard = [list(P.eval_batches(sub, T.EvalTransform(PP), 16, shard=(i, 3))) for i in range(3)]
    # Shards hold 34, 34, 33 examples; all yield ceil(34 / 16) = 3 batches so steps stay in lockstep.
    assert [len(b) for b in per_shard] == [3, 3, 3] == [P.num_eval_batches(101, 16, 3)] * 3
    seen = np.concatenate([b["index"][b["mask"]] for batches in per_shard for b in batches])
    np.testing.assert_array_equal(np.sort(seen), np.arange(101))
    np.testing.assert_array_equal(per_shard[1][0]["index"][:4], [1, 4, 7, 10])
    with pytest.raises(ValueError, match="shard"):
        P.eval_batches(sub, None, 16, shard=(3, 3))


def test_eval_batches_errors(digits_test):
    with pytest.raises(TypeError, match="deterministic"):
        P.eval_batches(digits_test, T.TrainTransform(PP), 8)
    with pytest.raises(TypeError, match="grain.transforms.Map"):
        P.eval_batches(digits_test, lambda x: x, 8)
    with pytest.raises(ValueError, match="batch_size"):
        P.eval_batches(digits_test, None, 0)


def test_eval_batches_tfds_two_workers(tiny_tfds_dir):
    """The tiny tfds ArrayRecord build through grain with 2 worker processes == in-process reading."""
    src = S.get_source("tfds:bob_tiny_digits", "test", data_dir=tiny_tfds_dir)
    single = list(P.eval_batches(src, T.EvalTransform(PP), 16))
    multi = _within_deadline(lambda: list(P.eval_batches(src, T.EvalTransform(PP), 16, num_workers=2)))
    assert len(single) == 4 and single[-1]["mask"].sum() == 60 - 48
    _equal_batches(single, multi)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in multi])[:60], src.labels())


def test_train_resume_exact(digits_test):
    ds = P.train_dataset(digits_test, T.TrainTransform(PP), 32, seed=11)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    json.dumps(state)  # serialisable, so it can be stored beside the model checkpoint
    expected = [next(it) for _ in range(3)]
    resumed = iter(P.train_dataset(digits_test, T.TrainTransform(PP), 32, seed=11))
    resumed.set_state(state)
    _equal_batches(expected, [next(resumed) for _ in range(3)])
    b = expected[0]
    assert (
        b["image"].shape == (32, 16, 16, 3) and b["image"].dtype == np.uint8 and b["label"].dtype == np.int32
    )
    # Another seed gives other batches.
    other = iter(P.train_dataset(digits_test, T.TrainTransform(PP), 32, seed=12))
    assert not np.array_equal(next(other)["index"], next(iter(ds))["index"])


def test_train_epochs_shuffle_and_remainder(digits_test):
    sub = S.Subset(digits_test, np.arange(48))
    batches = list(P.train_dataset(sub, T.TrainTransform(PP), 16, seed=0, num_epochs=2))
    assert len(batches) == 6
    idx = np.concatenate([b["index"] for b in batches])
    epoch1, epoch2 = idx[:48], idx[48:]
    np.testing.assert_array_equal(np.sort(epoch1), np.arange(48))
    np.testing.assert_array_equal(np.sort(epoch2), np.arange(48))
    assert not np.array_equal(epoch1, np.arange(48)) and not np.array_equal(epoch1, epoch2)  # reshuffled
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(labels, digits_test.labels()[idx])
    # The same example gets different augmentation in different epochs.
    k = int(epoch1[0])
    pos2 = 48 + int(np.flatnonzero(epoch2 == k)[0])
    assert not np.array_equal(batches[0]["image"][0], batches[pos2 // 16]["image"][pos2 % 16])
    # No shuffle, deterministic Map transform, keep the remainder.
    plain = list(
        P.train_dataset(
            sub, T.EvalTransform(PP), 20, seed=0, num_epochs=1, shuffle=False, drop_remainder=False
        )
    )
    assert [len(b["index"]) for b in plain] == [20, 20, 8]
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in plain]), np.arange(48))
    dropped = list(P.train_dataset(sub, T.EvalTransform(PP), 20, seed=0, num_epochs=1, shuffle=False))
    assert [len(b["index"]) for b in dropped] == [20, 20]
    with pytest.raises(ValueError, match="num_epochs"):
        P.train_dataset(sub, None, 4, seed=0, num_epochs=0)


def test_train_two_workers_equal_single_and_resume(digits_test):
    """mp_prefetch with 2 workers yields the single-process batches, and its state resumes exactly in a
    fresh iterator (what a checkpoint restore does)."""
    tf = T.TrainTransform(PP)
    single = iter(P.train_dataset(digits_test, tf, 24, seed=5))
    expected = [next(single) for _ in range(6)]

    def first_run():
        multi = iter(P.train_dataset(digits_test, tf, 24, seed=5, num_workers=2))
        try:
            got = [next(multi) for _ in range(4)]
            state = multi.get_state()
            return got + [next(multi) for _ in range(2)], state
        finally:
            multi.close()

    def resumed_run(state):
        resumed = iter(P.train_dataset(digits_test, tf, 24, seed=5, num_workers=2))
        try:
            resumed.set_state(state)
            return [next(resumed) for _ in range(2)]
        finally:
            resumed.close()

    got, state = _within_deadline(first_run)
    _equal_batches(expected, got)
    _equal_batches(expected[4:], _within_deadline(lambda: resumed_run(state)))
