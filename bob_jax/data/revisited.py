"""Revisited Oxford and Paris (Radenović et al., CVPR 2018) as one evaluation source: database, then queries.

Layout, as revisitop's ``python/download.py`` writes it (http://cmp.felk.cvut.cz/revisitop/)::

    <data_dir>/roxford5k/gnd_roxford5k.pkl      <data_dir>/rparis6k/gnd_rparis6k.pkl
    <data_dir>/roxford5k/jpg/<image>.jpg        <data_dir>/rparis6k/jpg/<image>.jpg

``data_dir`` may also be revisitop's data root (holding ``datasets/<name>/``) or the dataset folder itself.
The pickle holds ``imlist`` (database image names without extension), ``qimlist`` (the 70 queries) and
``gnd``: per query ``easy``, ``hard``, ``junk`` (database indices) and ``bbx`` (the query box x0, y0, x1, y1).

Items are the database images in ``imlist`` order followed by the queries in ``qimlist`` order; the label
is the role (0 = database, 1 = query), so features extracted from the source split at ``num_database``.
Two ways to read the queries, both recorded in ``describe()``:

* ``bob`` split: queries **not** cropped, every image shrunk to fit 224 x 224 with PIL's
  ``thumbnail((224, 224), LANCZOS)`` -- ``OxfordParisDataset`` in ``hsouri/bob-retrieval`` (imsize 224),
  as in DINO's ``eval_image_retrieval.py``; the backbone's resize / crop follows.
* ``official`` split: queries cropped to ``bbx`` with ``PIL.Image.crop`` (coordinates rounded), full-size
  images -- revisitop's ``example_process_images.py``, the protocol the revisited paper prescribes.

The ground-truth pickle is read with the restricted unpickler of :mod:`bob_jax.io` (containers, strings,
numbers and plain numeric numpy arrays only; nothing is imported or run).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bob_jax.data.sources import _init_pil, read_rgb

__all__ = ["REVISITED_DATASETS", "REVISITED_SPLITS", "REVISITOP_URL", "RevisitedSource"]

REVISITED_DATASETS = ("roxford5k", "rparis6k")
REVISITOP_URL = "http://cmp.felk.cvut.cz/revisitop/"
# split name -> how the source reads images (see the module docstring).
REVISITED_SPLITS: dict[str, dict[str, Any]] = {
    "bob": {"crop_queries": False, "thumbnail": 224},
    "official": {"crop_queries": True, "thumbnail": None},
}
ROLES = ("database", "query")


def _layout_help(name: str) -> str:
    return (
        f"expected <data_dir>/{name}/gnd_{name}.pkl and <data_dir>/{name}/jpg/<image>.jpg (revisitop's "
        "layout). "
        f"Fix: download the images and gnd_{name}.pkl as described at {REVISITOP_URL} (revisitop's "
        "python/download.py:download_datasets(<root>) writes <root>/datasets/<name>/), then pass "
        f"data_dir=<the folder holding {name}/>"
    )


def _locate(data_dir: str | os.PathLike | None, name: str) -> Path:
    if data_dir is None:
        raise ValueError(f"the revisited source {name!r} needs data_dir; {_layout_help(name)}")
    base = Path(data_dir).expanduser()
    candidates = [base / name, base / "datasets" / name, base]
    for root in candidates:
        if (root / f"gnd_{name}.pkl").is_file():
            return root
    raise FileNotFoundError(
        f"gnd_{name}.pkl not found in {[str(c) for c in candidates]}; {_layout_help(name)}"
    )


def _index_array(value: Any, what: str, num_database: int) -> np.ndarray:
    arr = np.asarray(value)
    whole = np.issubdtype(arr.dtype, np.integer) or (
        np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr))  # e.g. an empty float list
    )
    if arr.size and not whole:
        raise ValueError(f"{what} must hold integer database indices, got {arr.dtype} values")
    arr = arr.astype(np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= num_database):
        raise ValueError(f"{what} holds indices outside [0, {num_database}) (the database size)")
    return arr


def _read_ground_truth(path: Path) -> dict[str, Any]:
    from bob_jax.io import CheckpointError, load_checkpoint_tree

    try:
        cfg = load_checkpoint_tree(path)
    except CheckpointError as e:
        raise ValueError(
            f"{path}: not a readable revisitop ground-truth pickle ({e}); re-download it from {REVISITOP_URL}"
        ) from None
    if not isinstance(cfg, Mapping) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        keys = sorted(cfg) if isinstance(cfg, Mapping) else type(cfg).__name__
        raise ValueError(f"{path}: expected a dict with imlist, qimlist and gnd, got {keys}")
    imlist, qimlist, gnd = cfg["imlist"], cfg["qimlist"], cfg["gnd"]
    for what, names in (("imlist", imlist), ("qimlist", qimlist)):
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path}: {what} must be a list of image names (str)")
    if not isinstance(gnd, (list, tuple)) or len(gnd) != len(qimlist):
        raise ValueError(
            f"{path}: gnd must hold one entry per query ({len(qimlist)}), got {type(gnd).__name__}"
        )
    entries = []
    for i, g in enumerate(gnd):
        if not isinstance(g, Mapping) or not {"easy", "hard", "junk"} <= set(g):
            raise ValueError(f"{path}: gnd[{i}] must be a dict with easy, hard and junk")
        entry = {
            k: _index_array(g[k], f"{path}: gnd[{i}][{k!r}]", len(imlist)) for k in ("easy", "hard", "junk")
        }
        bbx = g.get("bbx")
        if bbx is not None:
            bbx = tuple(float(v) for v in np.asarray(bbx, dtype=np.float64).reshape(-1))
            if len(bbx) != 4:
                raise ValueError(f"{path}: gnd[{i}]['bbx'] must be 4 numbers (x0, y0, x1, y1), got {bbx}")
        entry["bbx"] = bbx
        entries.append(entry)
    return {"imlist": tuple(imlist), "qimlist": tuple(qimlist), "gnd": entries}


class RevisitedSource:
    """ROxford5k / RParis6k: database images (label 0) then queries (label 1), with revisitop's ground truth.

    ``gnd``: per query ``easy``/``hard``/``junk`` int64 database indices and ``bbx`` (a tuple, or None).
    ``crop_queries`` crops queries to ``bbx`` (the official protocol; BoB did not); ``thumbnail`` shrinks
    every image to fit ``thumbnail`` x ``thumbnail`` (PIL LANCZOS, aspect kept) as BoB's loader did.
    """

    num_classes = len(ROLES)
    class_names = ROLES

    def __init__(
        self,
        data_dir: str | os.PathLike | None,
        name: str,
        *,
        crop_queries: bool = False,
        thumbnail: int | None = None,
        split: str | None = None,
    ):
        name = name.strip().lower()
        if name not in REVISITED_DATASETS:
            raise ValueError(f"unknown revisited dataset {name!r}; use one of {REVISITED_DATASETS}")
        if thumbnail is not None and int(thumbnail) < 1:
            raise ValueError(f"thumbnail must be a positive size or None, got {thumbnail}")
        self.name, self.split = name, split
        self.crop_queries = bool(crop_queries)
        self.thumbnail = None if thumbnail is None else int(thumbnail)
        self.root = _locate(data_dir, name)
        self.gnd_path = self.root / f"gnd_{name}.pkl"
        self.gnd_sha256 = hashlib.sha256(self.gnd_path.read_bytes()).hexdigest()
        cfg = _read_ground_truth(self.gnd_path)
        self.imlist, self.qimlist, self.gnd = cfg["imlist"], cfg["qimlist"], cfg["gnd"]
        if self.crop_queries and any(g["bbx"] is None for g in self.gnd):
            raise ValueError(f"{self.gnd_path}: crop_queries=True needs a bbx for every query")
        self.image_dir = self.root / "jpg"
        missing = [n for n in (*self.imlist, *self.qimlist) if not (self.image_dir / f"{n}.jpg").is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of the {len(self.imlist) + len(self.qimlist)} images named by "
                f"{self.gnd_path.name} are missing from {self.image_dir} (e.g. {missing[:3]}); "
                f"{_layout_help(name)}"
            )
        self._labels = np.repeat(np.arange(2, dtype=np.int32), [len(self.imlist), len(self.qimlist)])
        _init_pil()

    @classmethod
    def from_split(cls, data_dir, name: str, split: str, **kwargs) -> RevisitedSource:
        """`split` picks how queries and images are read: 'bob' or 'official' (see the module docstring)."""
        if split not in REVISITED_SPLITS:
            raise ValueError(
                f"revisited:{name} has splits {tuple(REVISITED_SPLITS)} (how queries are read: 'bob' = "
                "uncropped, thumbnail 224, as the original; 'official' = cropped to bbx), got "
                f"split={split!r}"
            )
        return cls(data_dir, name, **{**REVISITED_SPLITS[split], **kwargs}, split=split)

    def __setstate__(self, state):
        self.__dict__.update(state)
        _init_pil()

    @property
    def num_database(self) -> int:
        return len(self.imlist)

    @property
    def num_queries(self) -> int:
        return len(self.qimlist)

    def __len__(self) -> int:
        return self.num_database + self.num_queries

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside [0, {len(self)})")
        is_query = index >= self.num_database
        name = self.qimlist[index - self.num_database] if is_query else self.imlist[index]
        path = self.image_dir / f"{name}.jpg"
        image = read_rgb(path)  # full decode, as BoB's and revisitop's loaders
        if is_query and self.crop_queries:
            image = image.crop(self.gnd[index - self.num_database]["bbx"])
        if self.thumbnail is not None:
            image.thumbnail((self.thumbnail, self.thumbnail), Image.Resampling.LANCZOS)
        return {"image": np.asarray(image), "label": self._labels[index], "name": name}

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def names(self) -> tuple[str, ...]:
        return (*self.imlist, *self.qimlist)

    def describe(self) -> dict[str, Any]:
        return {
            "name": f"revisited:{self.name}",
            "split": self.split,
            "size": len(self),
            "num_classes": self.num_classes,
            "origin": {"root": str(self.root), "gnd_sha256": self.gnd_sha256,
                       "num_database": self.num_database, "num_queries": self.num_queries},
            "queries": {"crop_to_bbx": self.crop_queries, "thumbnail": self.thumbnail},
            "subset": None,
        }

    def __repr__(self) -> str:
        return (
            f"RevisitedSource({self.name!r}, database={self.num_database}, queries={self.num_queries}, "
            f"crop_queries={self.crop_queries}, thumbnail={self.thumbnail})"
        )
