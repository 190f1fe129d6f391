"""Frozen features: extracted once per (backbone, weights, dataset, preprocessing), then shared.

Every frozen-feature task (linear probe on cached features, kNN, retrieval) reads the same arrays,
so a backbone's trunk runs over a dataset exactly once. Extraction is a jitted forward over a mesh
(batch sharded on "data", weights replicated); uint8 batches are normalised on the device. Arrays
are cached as `.npz` under a key that hashes everything that determines them, written atomically.

Multi-host: `batch_size` is the global batch; each process reads only its rows of every global batch
(`eval_batches(process=...)`), the forward runs once over the global mesh, and the whole feature
matrix, in source order, is gathered onto every process, so the tasks' host code sees the same arrays
everywhere. Process 0 alone writes the cache; a cached file is read only when every process sees it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from bob_jax import parallel
from bob_jax.backbones.preprocess import Preprocess, normalize


@dataclasses.dataclass(frozen=True)
class Features:
    features: np.ndarray  # [N, D] float32
    labels: np.ndarray  # [N] int32 class ids, or [N, L] float32 0/1 targets of a multi-label source
    key: str
    cached: bool = False
    output: str = "pooled"  # the model output key or registered descriptor the features come from


def cache_key(model: nnx.Module, source_info: dict, preprocess: Preprocess, output: str) -> str:
    payload = {
        "backbone": model.name,
        "weights": model.weights_id,
        "source": source_info,
        "preprocess": preprocess.to_dict(),
        "output": output,
        "format": 1,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


# Named descriptors beyond the model's output keys: name -> fn(model, normalized images) -> [B, D].
# Tasks that need another descriptor (e.g. DINOv2's linear-eval concatenation) register one here.
DESCRIPTORS: dict[str, Callable[[nnx.Module, jax.Array], jax.Array]] = {}


def register_descriptor(name: str, fn: Callable[[nnx.Module, jax.Array], jax.Array]) -> None:
    DESCRIPTORS[name] = fn


def class_token(model: nnx.Module, x: jax.Array) -> jax.Array:
    """A ViT's class token after the final norm, before any pooling choice, fc_norm or head (projection).

    timm's `forward_features(x)[:, 0]`: BoB's retrieval descriptor for CLIP ViTs, and what the MAE and
    MoCo v3 models of `hsouri/bob-retrieval` return from `forward_features` (`norm(x)[:, 0]`). Equal to
    "pooled" under class-token pooling without fc_norm; a model built with global_pool='avg' differs.
    """
    cfg = getattr(model, "cfg", None)
    name = getattr(model, "name", type(model).__name__)
    if not getattr(cfg, "class_token", False) or not hasattr(model, "norm"):
        raise ValueError(f"descriptor 'cls_token' needs a ViT with a class token; {name} has none")
    if model.norm is None:
        raise ValueError(
            f"{name} was built with fc_norm (no final norm over the tokens), so there is no normed class "
            "token; build it with fc_norm=False or use the 'pooled' output"
        )
    last = model(x, intermediates=True)["intermediates"][f"blocks.{len(model.blocks) - 1}"]["cls"]
    return model.norm(last)  # LayerNorm acts per token: norm(x)[:, 0] == norm(x[:, 0])


register_descriptor("cls_token", class_token)


def _descriptor(model: nnx.Module, x: jax.Array, output: str) -> jax.Array:
    if output in DESCRIPTORS:
        return DESCRIPTORS[output](model, x)
    out = model(x)
    if output not in out:
        raise ValueError(
            f"feature output {output!r} is neither a model output ({sorted(out)}) nor a registered "
            f"descriptor ({sorted(DESCRIPTORS)})"
        )
    return out[output]


def _embed_fn(graphdef, preprocess: Preprocess, output: str, mesh):
    def embed(state, images):
        model = nnx.merge(graphdef, state)
        return _descriptor(model, normalize(images, preprocess), output)

    return jax.jit(
        embed,
        in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh)),
        out_shardings=parallel.data_sharding(mesh),
    )


def extract_features(
    model: nnx.Module,
    source,
    *,
    preprocess: Preprocess | None = None,
    batch_size: int = 64,
    output: str = "pooled",
    mesh: jax.sharding.Mesh | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    progress: bool = True,
    description: str = "features",
) -> Features:
    """`model`'s `output` for every example of `source`, in source order: a key of the model's output
    dict ("pooled" by default) or a descriptor registered in `DESCRIPTORS`.

    `batch_size` is the global batch, rounded up to a multiple of the mesh's data shards and of the
    process count; with several processes every process returns the same (whole) arrays."""
    from bob_jax.data.pipelines import eval_batches
    from bob_jax.data.transforms import EvalTransform

    preprocess = preprocess or model.preprocess
    key = cache_key(model, source.describe(), preprocess, output)
    path = pathlib.Path(cache_dir) / f"{key}.npz" if cache_dir else None
    if path is not None and _cache_hit_everywhere(path):
        with np.load(path) as f:
            return Features(f["features"], f["labels"], key, cached=True, output=output)

    mesh = mesh or parallel.make_mesh()
    batch_size, process = _global_batch(batch_size, mesh)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, parallel.replicated(mesh))
    embed = _embed_fn(graphdef, preprocess, output, mesh)
    feats, labels, indices = [], [], []
    batches = eval_batches(source, EvalTransform(preprocess), batch_size, num_workers=num_workers,
                           process=process)
    total = -(-len(source) // batch_size)
    with _progress(progress and jax.process_index() == 0, description, total) as advance:
        for batch in batches:
            out = embed(state, parallel.shard_batch({"image": batch["image"]}, mesh)["image"])
            out, label, index = _whole_batch(out, batch["label"], batch["index"])
            keep = index >= 0  # padding rows have index -1
            feats.append(np.asarray(out, np.float32)[keep])
            labels.append(_labels(label[keep]))
            indices.append(index[keep])
            advance()
    result = Features(*_source_order(feats, labels, indices, len(source)), key, output=output)
    if path is not None:
        _save_from_process_0(path, result)
    return result


def _global_batch(batch_size: int, mesh) -> tuple[int, tuple[int, int] | None]:
    """(global batch, `eval_batches`' `process` argument): a multiple of the mesh's data shards and of
    the process count, each process reading its contiguous rows of every global batch."""
    n_proc = jax.process_count()
    unit = math.lcm(parallel.num_data_shards(mesh), n_proc)
    batch_size = -(-batch_size // unit) * unit
    return batch_size, None if n_proc == 1 else (jax.process_index(), n_proc)


def _whole_batch(out: jax.Array, label: np.ndarray, index: np.ndarray):
    """The global batch's features, labels and source positions on every process (host numpy).

    `out` is sharded over the mesh (its rows live on several processes); labels and positions are this
    process's rows, concatenated in process order, which is the rows' order in the global batch."""
    if jax.process_count() == 1:
        return np.asarray(out), np.asarray(label), np.asarray(index)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather((out, np.asarray(label), np.asarray(index)), tiled=True)


def _source_order(feats, labels, indices, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated rows sorted by source position; every position exactly once, or an error."""
    if not indices:
        raise ValueError("feature extraction: the source is empty; there is nothing to extract.")
    index = np.concatenate(indices)
    order = np.argsort(index, kind="stable")
    if not np.array_equal(index[order], np.arange(n)):
        raise RuntimeError(
            f"feature extraction returned source positions {index.tolist()[:20]}... for a source of {n} "
            "examples; every example must appear exactly once (does the source's length change?)"
        )
    return np.concatenate(feats)[order], np.concatenate(labels)[order]


def _cache_hit_everywhere(path: pathlib.Path) -> bool:
    """Whether every process sees the cached file. Processes must agree (extraction is collective): with
    a cache directory that is not shared between hosts, or while another job writes the file, some see
    it and others not, and then all extract again."""
    hit = path.exists()
    if jax.process_count() == 1:
        return hit
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(hit))))


def _save_from_process_0(path: pathlib.Path, feats: Features) -> None:
    """Process 0 writes the cache (every process holds the same arrays); the others wait for the file, so
    a following `extract_features` of the same key finds it in every process of a shared directory."""
    if jax.process_index() == 0:
        _save_atomic(path, feats)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"bob_jax features {path.name}")


def _labels(batch_labels: np.ndarray) -> np.ndarray:
    """Class ids [B] -> int32; multi-label targets [B, L] (a vector label per example) -> float32."""
    batch_labels = np.asarray(batch_labels)
    if batch_labels.ndim == 1:
        return batch_labels.astype(np.int32)
    if batch_labels.ndim == 2:
        return batch_labels.astype(np.float32)
    raise ValueError(
        f"labels must be class ids [B] or multi-label targets [B, L]; got shape {batch_labels.shape}"
    )


def _save_atomic(path: pathlib.Path, feats: Features) -> None:
    from bob_jax.results import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, features=feats.features, labels=feats.labels)
    atomic_write_bytes(path, buf.getvalue())


class _progress:
    """A rich progress bar (or nothing), used as `with _progress(...) as advance: advance()`."""

    def __init__(self, enabled: bool, description: str, total: int):
        self.enabled, self.description, self.total = enabled, description, total

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False
        )
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
