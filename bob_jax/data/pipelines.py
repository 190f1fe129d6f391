"""grain input pipelines: fixed-shape eval batches with a padding mask, and resumable train datasets.

Eval (`eval_batches`): every example exactly once, in source order; the last batch is padded to the full
batch size with `mask=False` so a jitted step sees one shape. Train (`train_dataset`): grain's
`MapDataset.source -> seed -> shuffle -> repeat -> random_map/map -> batch` chain (google/grain
`docs/tutorials/jax_training_tutorial.md`), returned as an `IterDataset` whose iterator
`get_state()` / `set_state()` resume exactly. Shuffling (per-epoch reseeded) and augmentation randomness
depend only on the seed and the element index, so worker count and resumption do not change batches.

Batches are dicts of numpy arrays: image uint8 [B, S, S, 3], label int32 [B], index int64 [B] (position
in the source), and for eval mask bool [B].
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from bob_jax.data.sources import read_many

__all__ = ["eval_batches", "ensure_absl_flags_parsed", "num_eval_batches", "train_dataset"]


def ensure_absl_flags_parsed() -> None:
    """grain 0.2.18 multi-worker loaders read an absl flag, which raises when flags are unparsed
    outside `absl.app.run` (google/grain#1355). Marking them parsed keeps the flag defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class _Example(grain.transforms.Map):
    """Source element -> {"image", "label", "index"} with fixed dtypes (drops extras like "name")."""

    def map(self, element):
        index, ex = element
        return {"image": ex["image"], "label": np.int32(ex["label"]), "index": np.int64(index)}


class _Indexed:
    """Wraps a source so each element carries its position (picklable, random access)."""

    def __init__(self, source, indices: np.ndarray | None = None):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.source) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int):
        i = int(i)
        j = i if self.indices is None else int(self.indices[i])
        return j, self.source[j]

    def _getitems(self, indices):
        # grain batches through `_getitems`; forwarding it keeps batched reads (ArrayRecord) batched.
        js = [int(i) if self.indices is None else int(self.indices[int(i)]) for i in indices]
        return list(zip(js, read_many(self.source, js), strict=True))


class _EvalMap(grain.transforms.Map):
    def __init__(self, transform):
        self.transform = transform

    def map(self, element):
        out = _Example().map(element)
        if self.transform is not None:
            out = self.transform.map(out)
        return out


class _TrainRandomMap(grain.transforms.RandomMap):
    def __init__(self, transform):
        self.transform = transform

    def random_map(self, element, rng):
        return self.transform.random_map(_Example().map(element), rng)


def _check_transform(transform) -> None:
    if transform is not None and not isinstance(
        transform, (grain.transforms.Map, grain.transforms.RandomMap)
    ):
        raise TypeError(
            f"transform must be a grain.transforms.Map or RandomMap (e.g. EvalTransform / TrainTransform), "
            f"got {type(transform).__name__}"
        )


def _shard_indices(n: int, shard: tuple[int, int] | None) -> np.ndarray | None:
    if shard is None:
        return None
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard=(index, count) needs 0 <= index < count, got {shard}")
    return np.arange(index, n, count, dtype=np.int64)


def num_eval_batches(num_examples: int, batch_size: int, shard_count: int = 1) -> int:
    """Batches per shard: the same for every shard, so multi-process eval steps stay in lockstep."""
    return math.ceil(math.ceil(num_examples / shard_count) / batch_size)


def _read_options(num_threads: int, prefetch: int) -> grain.ReadOptions:
    # grain's default buffer is 500 elements, and elements here are whole batches (gigabytes for
    # ImageNet-sized batches). Threads parallelise over batches, so the buffer holds at least one
    # batch per thread.
    if num_threads < 1 or prefetch < 1:
        raise ValueError(f"num_threads and prefetch must be >= 1, got {num_threads}, {prefetch}")
    return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(prefetch, num_threads))


def _copy_out(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    # Copies detach the batch from grain's shared-memory buffers (multi-worker), avoiding the
    # SharedMemoryArray exit noise described in docs/environment.md §5.
    return {k: np.asarray(v).copy() for k, v in batch.items()}


class _CopyOut(grain.transforms.Map):
    def map(self, element):
        return _copy_out(element)


def eval_batches(
    source,
    transform,
    batch_size: int,
    *,
    num_workers: int = 0,
    shard: tuple[int, int] | None = None,
    num_threads: int = 4,
    prefetch: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example of `source` once, in order, in batches of exactly `batch_size`.

    `transform`: a deterministic grain `Map` on element dicts (e.g. `EvalTransform(preprocess)`), or None
    when images already have one shape. The final batch is padded with zero images, label -1,
    index -1 and mask False. `shard=(i, n)` reads examples i, i+n, ... (multi-host eval); every shard
    yields `num_eval_batches(len(source), batch_size, n)` batches. `num_threads` batches are built
    concurrently (per worker process with `num_workers > 0`); at most `prefetch` batches wait ahead.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(transform, grain.transforms.RandomMap):
        raise TypeError("eval_batches needs a deterministic transform (grain Map), got a RandomMap")
    _check_transform(transform)
    shard_idx = _shard_indices(len(source), shard)
    indexed = _Indexed(source, shard_idx)
    total_batches = num_eval_batches(len(source), batch_size, 1 if shard is None else shard[1])
    if len(indexed) == 0 and total_batches == 0:
        return iter(())

    ds = grain.MapDataset.source(indexed).map(_EvalMap(transform)).batch(batch_size, drop_remainder=False)
    it_ds = ds.to_iter_dataset(_read_options(num_threads, prefetch))
    if num_workers > 0:
        ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch)
        )

    def generate():
        template = None
        emitted = 0
        iterator = iter(it_ds)
        try:
            for batch in iterator:
                batch = _copy_out(batch)
                n = len(batch["label"])
                batch["mask"] = np.ones((n,), bool)
                if template is None:
                    template = {k: (v.shape[1:], v.dtype) for k, v in batch.items()}
                if n < batch_size:
                    batch = _pad(batch, batch_size, template)
                emitted += 1
                yield batch
        finally:
            # Stop worker processes now rather than at garbage collection (also when the caller stops
            # iterating early).
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            del iterator
        if template is None and total_batches:
            raise ValueError(
                "this shard holds no examples, so the padded batch shape is unknown; use fewer shards"
            )
        # A shard with fewer examples still yields as many (fully padded) batches as the largest one.
        while emitted < total_batches:
            emitted += 1
            yield _pad({k: np.zeros((0,) + s, d) for k, (s, d) in template.items()}, batch_size, template)

    return generate()


def _pad(batch: dict[str, np.ndarray], batch_size: int, template) -> dict[str, np.ndarray]:
    n = len(batch["mask"])
    fill = {"label": -1, "index": -1, "mask": False}
    out = {}
    for k, (shape, dtype) in template.items():
        pad = np.full((batch_size - n,) + shape, fill.get(k, 0), dtype)
        out[k] = np.concatenate([batch[k], pad], axis=0)
    return out


def train_dataset(
    source,
    transform,
    batch_size: int,
    *,
    seed: int,
    num_epochs: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
    num_workers: int = 0,
    shard: tuple[int, int] | None = None,
    num_threads: int = 4,
    prefetch: int = 4,
) -> grain.IterDataset:
    """Shuffled (reshuffled every epoch), augmented, batched training data as a grain `IterDataset`.

    `transform`: a grain `RandomMap` (e.g. `TrainTransform(preprocess)`; its rng comes from `seed` and
    the element's position in the repeated stream) or `Map`. `num_epochs=None` repeats forever.
    `iter(ds)` gives an iterator with `get_state()` / `set_state(state)` for exact resumption (store
    the state with the checkpoint). `shard=(i, n)` keeps examples i, i+n, ... before shuffling.
    `num_threads` / `prefetch` as in `eval_batches`.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None (forever), got {num_epochs}")
    _check_transform(transform)
    indexed = _Indexed(source, _shard_indices(len(source), shard))
    if len(indexed) == 0:
        raise ValueError(f"train_dataset: the source (shard {shard}) holds no examples")
    ds = grain.MapDataset.source(indexed).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(num_epochs)
    if isinstance(transform, grain.transforms.RandomMap):
        ds = ds.random_map(_TrainRandomMap(transform))
    else:
        ds = ds.map(_EvalMap(transform))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).to_iter_dataset(
        _read_options(num_threads, prefetch)
    )
    if num_workers > 0:
        ensure_absl_flags_parsed()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch)
        )
        # Runs in the main process: detach batches from the workers' shared memory. The map keeps the
        # iterator's get_state()/set_state().
        ds = ds.map(_CopyOut())
    return ds
