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


def _process_block_indices(num: int, batch_size: int, p: int, n: int) -> np.ndarray:
    """Source positions of process p's rows of each global batch, in order (see `eval_batches`)."""
    local = batch_size // n
    starts = np.arange(math.ceil(num / batch_size), dtype=np.int64) * batch_size + p * local
    positions = (starts[:, None] + np.arange(local, dtype=np.int64)[None, :]).ravel()
    return positions[positions < num]


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
    process: tuple[int, int] | None = None,
    num_threads: int = 4,
    prefetch: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example of `source` once, in order, in batches of exactly `batch_size`.

    `transform`: a deterministic grain `Map` on element dicts (e.g. `EvalTransform(preprocess)`), or None
    when images already have one shape. The final batch is padded with zero images, label -1,
    index -1 and mask False. `shard=(i, n)` reads examples i, i+n, ... (multi-host eval); every shard
    yields `num_eval_batches(len(source), batch_size, n)` batches. `num_threads` batches are built
    concurrently (per worker process with `num_workers > 0`); at most `prefetch` batches wait ahead.

    `process=(p, n)` (multi-host): `batch_size` is the GLOBAL batch; this process yields rows
    [p * b, (p + 1) * b) of each of the ceil(len(source) / batch_size) global batches (b =
    batch_size / n), padded where the source ends, so the assembled global batches are exactly the
    single-process ones and every process runs the same number of steps.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(transform, grain.transforms.RandomMap):
        raise TypeError("eval_batches needs a deterministic transform (grain Map), got a RandomMap")
    _check_transform(transform)
    if process is not None and shard is not None:
        raise ValueError("eval_batches: pass shard=(i, n) or process=(p, n), not both")
    if process is not None:
        p, n = _check_process(process, batch_size, drop_remainder=True)
        indices = _process_block_indices(len(source), batch_size, p, n)
        total_batches = math.ceil(len(source) / batch_size)
        batch_size //= n
    else:
        indices = _shard_indices(len(source), shard)
        total_batches = num_eval_batches(len(source), batch_size, 1 if shard is None else shard[1])
    indexed = _Indexed(source, indices)
    if total_batches == 0:
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
        if template is None:
            # This shard/process holds no example: the padding takes its shapes from example 0.
            first = _copy_out(_EvalMap(transform).map((0, source[0])))
            template = {k: (v.shape, v.dtype) for k, v in first.items()}
            template["mask"] = ((), np.dtype(bool))
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


def _check_process(process: tuple[int, int] | None, batch_size: int, drop_remainder: bool) -> tuple[int, int]:
    if process is None:
        return 0, 1
    p, n = process
    if not 0 <= p < n:
        raise ValueError(f"process=(index, count) needs 0 <= index < count, got {process}")
    if batch_size % n:
        raise ValueError(
            f"the global batch size {batch_size} does not split evenly over {n} processes; use a "
            f"multiple of {n}."
        )
    if n > 1 and not drop_remainder:
        raise ValueError("process=(p, n) with n > 1 needs drop_remainder=True: every process must "
                         "see the same number of equally sized batches.")
    return p, n


def _process_batches(ds: grain.MapDataset, batch_size: int, drop_remainder: bool, p: int, n: int):
    """Process p's part of every global batch: batches of b = batch_size / n, where local batch k holds
    global positions k * batch_size + p * b + [0, b). The slice is lazy: grain reads only the
    elements of the batches this process takes."""
    if n == 1:
        return ds.batch(batch_size, drop_remainder=drop_remainder)
    local = batch_size // n
    num_global = len(ds) // batch_size  # complete global batches (effectively infinite when repeating)
    return ds.batch(local, drop_remainder=True)[: num_global * n][p::n]


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
    process: tuple[int, int] | None = None,
    num_threads: int = 4,
    prefetch: int = 4,
) -> grain.IterDataset:
    """Shuffled (reshuffled every epoch), augmented, batched training data as a grain `IterDataset`.

    `transform`: a grain `RandomMap` (e.g. `TrainTransform(preprocess)`; its rng comes from `seed` and
    the element's position in the repeated stream) or `Map`. `num_epochs=None` repeats forever.
    `iter(ds)` gives an iterator with `get_state()` / `set_state(state)` for exact resumption (store
    the state with the checkpoint). `shard=(i, n)` keeps examples i, i+n, ... before shuffling (a
    different data set per shard). `num_threads` / `prefetch` as in `eval_batches`.

    `process=(p, n)` (multi-host): `batch_size` is the GLOBAL batch and this process yields only its
    part, rows [p * b, (p + 1) * b) of every global batch (b = batch_size / n), reading only those
    examples. Shuffling and augmentation are those of the single-process stream, so the assembled
    global batches do not depend on the process count, and neither does the iterator state (the
    number of global batches consumed): a checkpoint resumes on any process count.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None (forever), got {num_epochs}")
    p, n = _check_process(process, batch_size, drop_remainder)
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
    ds = _process_batches(ds, batch_size, drop_remainder, p, n).to_iter_dataset(
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
