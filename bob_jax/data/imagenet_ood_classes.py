"""ImageNet-A / ImageNet-R: the 200 ImageNet-1k classes each set covers (package data, checked by hash).

The lists are the original BoB files `valid_labels_imagenet_{a,r}.txt` (repository root of
hsouri/bob-ood-classification @ 6c4908a1, copied byte for byte; provenance in `lists/README.md`).
The original evaluation (`classification/validate.py --valid_labels`) turns a list into a boolean mask
over the 1000 logits, `output[:, mask]`, so the 200 kept logits are in ascending class-index order and a
200-class label is the position of its 1000-class index in the ascending list. ImageFolder targets of the
original (sorted WordNet-id folders) are exactly those positions; tensorflow-datasets' `imagenet_a` /
`imagenet_r` give labels in the 1000-class space, which `to_masked_labels` converts.

numpy only; the files are read with `importlib.resources`, so they must ship as package data.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

import numpy as np

__all__ = ["OOD_CLASS_LISTS", "to_masked_labels", "valid_class_indices"]

# name -> (file under bob_jax/data/lists, sha256 of the original file)
OOD_CLASS_LISTS = {
    "imagenet_a": (
        "valid_labels_imagenet_a.txt",
        "e81223a35add6e78f9afe6f215652c1926ebefe1d8efc26c6e923d7ac9143937",
    ),
    "imagenet_r": (
        "valid_labels_imagenet_r.txt",
        "91e09d2ff0a002104bc0d37a892a7e75ffc2cc0db47b2b506047a3493b9116d2",
    ),
}
_NUM_IMAGENET_CLASSES = 1000
_NUM_OOD_CLASSES = 200


@functools.lru_cache(maxsize=None)
def _load(name: str) -> np.ndarray:
    filename, sha = OOD_CLASS_LISTS[name]
    path = resources.files("bob_jax.data").joinpath("lists", filename)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"package data file bob_jax/data/lists/{filename} is missing from this installation; the "
            "package was built without its data files (pyproject needs [tool.setuptools.package-data] "
            "'bob_jax.data' = ['lists/*.txt']); reinstall bob_jax"
        ) from e
    got = hashlib.sha256(raw).hexdigest()
    if got != sha:
        raise ValueError(
            f"bob_jax/data/lists/{filename} has sha256 {got}, expected {sha} (the original BoB list); "
            "the file was modified: restore it from git"
        )
    idx = np.asarray([int(tok) for tok in raw.split()], np.int64)
    # The hash pins the content; these checks document what the evaluation code relies on.
    assert idx.shape == (_NUM_OOD_CLASSES,) and np.all(np.diff(idx) > 0), filename
    assert idx[0] >= 0 and idx[-1] < _NUM_IMAGENET_CLASSES, filename
    idx.setflags(write=False)
    return idx


def valid_class_indices(name: str) -> np.ndarray:
    """The 200 ImageNet-1k indices covered by `name` ('imagenet_a' or 'imagenet_r'), ascending, int64."""
    key = name.strip().lower().replace("-", "_")
    if key not in OOD_CLASS_LISTS:
        raise ValueError(f"no 200-class list for {name!r}; known: {sorted(OOD_CLASS_LISTS)}")
    return _load(key)


def to_masked_labels(labels_1000, mask_indices) -> np.ndarray:
    """1000-class labels -> positions in the ascending `mask_indices` (the original 200-class targets).

    Raises ValueError naming the offending labels when a label is not one of the mask's classes (e.g. the
    wrong list for the dataset).
    """
    labels = np.asarray(labels_1000)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    mask_indices = np.asarray(mask_indices, np.int64)
    if mask_indices.ndim != 1 or np.any(np.diff(mask_indices) <= 0):
        raise ValueError("mask_indices must be a 1-D strictly ascending index list (as the original mask)")
    pos = np.searchsorted(mask_indices, labels)
    pos_clipped = np.minimum(pos, len(mask_indices) - 1)
    bad = mask_indices[pos_clipped] != labels
    if np.any(bad):
        raise ValueError(
            f"{int(bad.sum())} labels are not among the {len(mask_indices)} masked classes (first: "
            f"{np.unique(labels[bad])[:10].tolist()}); use the class list of the dataset being evaluated"
        )
    return pos.astype(np.int32)
