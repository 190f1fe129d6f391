"""Weighted k-nearest-neighbour classification on frozen features (jax.numpy, jitted, chunked).

Semantics follow DINO v1 ``eval_knn.py`` (``knn_classifier``) and DINOv2 ``dinov2/eval/knn.py`` (porting.md
13.2), re-implemented from their description:

* train and test features are L2-normalised; similarity is the dot product (cosine);
* each test sample takes its top-k most similar train samples;
* neighbour i votes for its label with weight ``exp(sim_i / T)`` (DINO v1, T = 0.07). DINOv2 uses
  ``softmax(sim / T)`` over the top max(k) neighbours, which divides every weight of a test sample by the
  same positive constant, so the argmax -- the prediction -- is identical;
* class scores are the summed weights, the prediction is their argmax (ties -> lowest class index).

Numerics: weights are computed as ``exp((sim_i - sim_max) / T)`` (shift by the test sample's best similarity),
again a per-sample constant factor, so very small temperatures cannot overflow float32.

Memory: test samples are processed ``chunk_size`` at a time and, within a chunk, the train set is scanned in
blocks of ``train_chunk_size`` rows while a running top-k is kept, so the similarity block is at most
``chunk_size x train_chunk_size`` (ImageNet's 1.28 M train features never need a 1.28 M-wide matrix). Every
chunk has the same padded shape, so each call compiles once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["knn_accuracy", "knn_classify", "knn_classify_multi"]


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    # Same clamp as torch.nn.functional.normalize: a zero feature stays zero instead of becoming NaN.
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=("k",))
def _topk_chunk(
    test: jax.Array, train_blocks: jax.Array, label_blocks: jax.Array, valid_blocks: jax.Array, *, k: int
) -> tuple[jax.Array, jax.Array]:
    """Top-k (similarity, label) of one test chunk against the blocked train set.

    ``train_blocks`` [B, tc, D] (normalised), ``label_blocks`` [B, tc] int32, ``valid_blocks`` [B, tc] bool
    (False on padding rows). Returns ``[c, k]`` similarities (descending) and labels.
    """
    test = _l2_normalize(test.astype(jnp.float32))
    c = test.shape[0]
    init = (jnp.full((c, k), -jnp.inf, jnp.float32), jnp.zeros((c, k), jnp.int32))

    def body(carry, block):
        best_sim, best_lab = carry
        feats, labs, valid = block
        sim = jnp.einsum("cd,nd->cn", test, feats, precision=jax.lax.Precision.HIGHEST)
        sim = jnp.where(valid[None, :], sim, -jnp.inf)
        kb = min(k, feats.shape[0])
        blk_sim, blk_idx = jax.lax.top_k(sim, kb)
        blk_lab = labs[blk_idx]
        # Running best first, so among equal similarities the earlier train index wins (as a global top-k).
        all_sim = jnp.concatenate([best_sim, blk_sim], axis=1)
        all_lab = jnp.concatenate([best_lab, blk_lab], axis=1)
        new_sim, pick = jax.lax.top_k(all_sim, k)
        return (new_sim, jnp.take_along_axis(all_lab, pick, axis=1)), None

    (sims, labels), _ = jax.lax.scan(body, init, (train_blocks, label_blocks, valid_blocks))
    return sims, labels


@functools.partial(jax.jit, static_argnames=("k", "num_classes", "temperature"))
def _vote(sims: jax.Array, labels: jax.Array, *, k: int, num_classes: int, temperature: float) -> jax.Array:
    """Argmax of ``sum_i exp((sim_i - sim_0) / T) * onehot(label_i)`` over the first k neighbours."""
    sims, labels = sims[:, :k], labels[:, :k]
    weights = jnp.exp((sims - sims[:, :1]) / temperature)
    # Scatter-add instead of a one-hot einsum: a [chunk, k, num_classes] one-hot would be 800 MB at
    # chunk 1024, k 200, 1000 classes.
    rows = jnp.broadcast_to(jnp.arange(sims.shape[0])[:, None], labels.shape)
    scores = jnp.zeros((sims.shape[0], num_classes), jnp.float32).at[rows, labels].add(weights)
    return jnp.argmax(scores, axis=1)


def _prepare_train(train_feats, train_labels, num_classes: int, train_chunk_size: int):
    train_feats = np.asarray(train_feats, dtype=np.float32)
    train_labels = np.asarray(train_labels)
    if train_feats.ndim != 2 or train_feats.shape[0] == 0:
        raise ValueError(
            f"train_feats must be a non-empty 2-D array [num_train, dim], got {train_feats.shape}."
        )
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError(f"train_labels must have shape ({train_feats.shape[0]},), got {train_labels.shape}.")
    if not np.issubdtype(train_labels.dtype, np.integer):
        raise ValueError(
            f"train_labels must be integers in [0, num_classes), got dtype {train_labels.dtype}."
        )
    if train_labels.min() < 0 or train_labels.max() >= num_classes:
        raise ValueError(
            f"train_labels span [{train_labels.min()}, {train_labels.max()}] but num_classes={num_classes}; "
            "labels must be contiguous ids in [0, num_classes)."
        )
    n, d = train_feats.shape
    tc = max(1, min(train_chunk_size, n))
    n_blocks = -(-n // tc)
    pad = n_blocks * tc - n
    feats = _l2_normalize(jnp.asarray(np.pad(train_feats, ((0, pad), (0, 0)))))
    labels = jnp.asarray(np.pad(train_labels.astype(np.int32), (0, pad)))
    valid = jnp.asarray(np.arange(n_blocks * tc) < n)
    return feats.reshape(n_blocks, tc, d), labels.reshape(n_blocks, tc), valid.reshape(n_blocks, tc), n


def knn_classify_multi(
    train_feats,
    train_labels,
    test_feats,
    *,
    num_classes: int,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    chunk_size: int = 1024,
    train_chunk_size: int = 65536,
) -> dict[int, np.ndarray]:
    """Predictions for several k from one top-max(k) search (DINOv2 evaluates k in {10, 20, 100, 200}).

    Each k larger than the train set is clipped to the train size (every train sample votes); the result
    dict is keyed by the requested k. See the module docstring for the voting rule.
    """
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty sequence of integers >= 1, got {ks!r}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if chunk_size < 1 or train_chunk_size < 1:
        raise ValueError(
            f"chunk sizes must be >= 1, got chunk_size={chunk_size}, train_chunk_size={train_chunk_size}."
        )
    blocks, label_blocks, valid_blocks, n_train = _prepare_train(
        train_feats, train_labels, num_classes, train_chunk_size
    )
    test_feats = np.asarray(test_feats, dtype=np.float32)
    if test_feats.ndim != 2 or test_feats.shape[1] != blocks.shape[-1]:
        raise ValueError(
            f"test_feats must be [num_test, {blocks.shape[-1]}] like the train features, "
            f"got {test_feats.shape}."
        )
    k_max = min(max(ks), n_train)
    n_test = test_feats.shape[0]
    c = max(1, min(chunk_size, n_test))
    preds = {k: np.empty(n_test, dtype=np.int64) for k in ks}
    for start in range(0, n_test, c):
        chunk = test_feats[start : start + c]
        m = chunk.shape[0]
        if m < c:  # pad the last chunk so every call reuses one compiled shape
            chunk = np.pad(chunk, ((0, c - m), (0, 0)))
        sims, labels = _topk_chunk(jnp.asarray(chunk), blocks, label_blocks, valid_blocks, k=k_max)
        for k in ks:
            p = _vote(
                sims, labels, k=min(k, n_train), num_classes=num_classes, temperature=float(temperature)
            )
            preds[k][start : start + m] = np.asarray(p)[:m]
    return preds


def knn_classify(
    train_feats,
    train_labels,
    test_feats,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    train_chunk_size: int = 65536,
) -> np.ndarray:
    """Weighted k-NN predictions ``[num_test]`` (int64) for ``test_feats`` given labelled ``train_feats``.

    Cosine similarity of L2-normalised features; the top ``min(k, num_train)`` neighbours vote with weight
    ``exp(sim / temperature)``; argmax of the summed votes (ties -> lowest class id). Labels must be integers
    in ``[0, num_classes)``.
    """
    return knn_classify_multi(
        train_feats,
        train_labels,
        test_feats,
        num_classes=num_classes,
        ks=(k,),
        temperature=temperature,
        chunk_size=chunk_size,
        train_chunk_size=train_chunk_size,
    )[int(k)]


def knn_accuracy(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    train_chunk_size: int = 65536,
) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of :func:`knn_classify` against ``test_labels``."""
    test_labels = np.asarray(test_labels)
    n_test = np.shape(test_feats)[0]
    if test_labels.shape != (n_test,):
        raise ValueError(f"test_labels must have shape ({n_test},), got {test_labels.shape}.")
    if n_test == 0:
        raise ValueError("there are no test samples.")
    preds = knn_classify(
        train_feats,
        train_labels,
        test_feats,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        chunk_size=chunk_size,
        train_chunk_size=train_chunk_size,
    )
    return float(np.mean(preds == test_labels))
