"""Random-access image classification sources for grain (`grain.MapDataset.source(source)`).

Every source returns `{"image": uint8 HxW or HxWxC, "label": int32 scalar}` (ImageFolder adds "name"),
has `num_classes`, `class_names`, a fast `labels()` (all labels as one int32 array, without decoding
images) and `describe()` (a JSON-friendly record of exactly which data was read, for results files).

Sources are plain module-level classes that open files lazily and drop open handles / decoded caches
when pickled, because grain's worker processes pickle the source.

Available (`get_source(spec, split)`):
  fashion_mnist   the Fashion-MNIST IDX files (Debian package `dataset-fashion-mnist` or a data_dir)
  digits          scikit-learn's bundled 8x8 digits with a fixed, library-independent stratified split
  tfds:<name>     a tensorflow-datasets ArrayRecord build read through `tfds.data_source` (no TensorFlow)
  folder:<root>   an ImageFolder tree root/<class>/<image files>
  revisited:<name> ROxford5k / RParis6k in revisitop's layout (`bob_jax.data.revisited`)
  <name>          a benchmark dataset of `bob_jax.data.datasets` (e.g. 'cifar100', 'imagenet_a'), also
  bench:<name>    spelled with the prefix; pinned splits, preparation steps in errors

Subsets (`Subset`, `seeded_subset`) record their seed and a sha256 of the chosen indices so a result
names exactly which examples it used.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIRS",
    "Digits",
    "FashionMNIST",
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "ImageFolder",
    "KNOWN_SOURCES",
    "Subset",
    "TfdsSource",
    "get_source",
    "indices_sha256",
    "read_many",
    "seeded_subset",
]

KNOWN_SOURCES = (
    "fashion_mnist", "digits", "shapes", "tfds:<name>", "folder:<root>", "revisited:<roxford5k|rparis6k>",
    "bench:<name>",
)


# --------------------------------------------------------------------------------------------------
# Deterministic, library-independent randomness for splits and subsets.
# numpy's and scikit-learn's shuffling algorithms are allowed to change between releases; a split that
# results depend on must not. SplitMix64 (Steele et al. 2014) is a fixed integer hash: ordering
# indices by hash(seed, index) gives a seeded permutation that is identical on every version.
# --------------------------------------------------------------------------------------------------

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


def _seeded_order(indices: np.ndarray, seed: int) -> np.ndarray:
    """`indices` permuted by a seeded hash (stable across numpy/sklearn versions)."""
    indices = np.asarray(indices, dtype=np.int64)
    key = _splitmix64(_splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF)) ^ indices.astype(np.uint64))
    return indices[np.argsort(key, kind="stable")]


def _largest_remainder(counts: np.ndarray, total: int) -> np.ndarray:
    """Split `total` over classes proportionally to `counts` (Hamilton's method; ties -> lower class)."""
    counts = np.asarray(counts, dtype=np.int64)
    quota = counts * total / counts.sum()
    alloc = np.floor(quota).astype(np.int64)
    remainder = quota - alloc
    order = np.lexsort((np.arange(len(counts)), -remainder))  # largest remainder first
    alloc[order[: total - alloc.sum()]] += 1
    return np.minimum(alloc, counts)


def _stratified_pick(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` indices, proportional per class, chosen per class by the seeded hash order; sorted."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    alloc = _largest_remainder(counts, n)
    chosen = []
    for c, k in zip(classes, alloc, strict=True):
        if k:
            chosen.append(_seeded_order(np.flatnonzero(labels == c), seed)[:k])
    out = np.sort(np.concatenate(chosen)) if chosen else np.zeros((0,), np.int64)
    assert len(out) == n, (len(out), n)
    return out


def read_many(source, indices: Sequence[int]) -> list:
    """`[source[i] for i in indices]`, through the source's batched `_getitems` when it has one."""
    getitems = getattr(source, "_getitems", None)
    if getitems is not None:
        return list(getitems(indices))
    return [source[i] for i in indices]


def indices_sha256(indices: Sequence[int] | np.ndarray) -> str:
    """sha256 of the indices as little-endian int64 bytes (how subsets are identified in results)."""
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def _check_split(split: str, allowed: Sequence[str], source: str) -> str:
    if split not in allowed:
        raise ValueError(f"{source} has splits {tuple(allowed)}, got split={split!r}")
    return split


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)
# --------------------------------------------------------------------------------------------------

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Where `apt-get install dataset-fashion-mnist` puts the files (see `dpkg -L dataset-fashion-mnist`).
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
_FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


def _open_maybe_gzip(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_idx_header(path: Path, magic: int, ndim: int) -> tuple[int, ...]:
    try:
        with _open_maybe_gzip(path) as f:
            head = f.read(4 + 4 * ndim)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(
            f"{path}: cannot read the IDX header ({e}); the file is corrupt, re-install it"
        ) from e
    if len(head) < 4 + 4 * ndim:
        raise ValueError(f"{path}: file too short for an IDX header; the file is truncated or corrupt")
    got = struct.unpack(">I", head[:4])[0]
    if got != magic:
        raise ValueError(
            f"{path}: IDX magic number is 0x{got:08x}, expected 0x{magic:08x}; this is not the "
            "expected Fashion-MNIST file (wrong file or corrupt)"
        )
    return struct.unpack(f">{ndim}I", head[4:])


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    dims = _read_idx_header(path, magic, ndim)
    expected = int(np.prod(dims))
    try:
        with _open_maybe_gzip(path) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot decompress/read ({e}); the file is corrupt, re-install it") from e
    payload = memoryview(data)[4 + 4 * ndim :]
    if len(payload) != expected:
        raise ValueError(
            f"{path}: IDX header promises {dims} = {expected} bytes of data but the file holds "
            f"{len(payload)}; the file is truncated or corrupt"
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


class FashionMNIST:
    """Fashion-MNIST (Xiao et al. 2017), 28x28 grey images, 10 classes; train 60,000 / test 10,000.

    Reads `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` from `data_dir` (also its `fashion-mnist`
    / `fashion_mnist` sub-folder) or, without `data_dir`, from the Debian package location. Labels are
    read eagerly (tiny); the image array is decoded on first access and not pickled.
    """

    num_classes = 10
    class_names = FASHION_MNIST_CLASSES

    def __init__(self, split: str = "train", data_dir: str | os.PathLike | None = None):
        self.split = _check_split(split, tuple(_FASHION_MNIST_PREFIX), "fashion_mnist")
        self._images_path, self._labels_path = self._locate(split, data_dir)
        self._labels = _read_idx(self._labels_path, _IDX_LABELS_MAGIC, 1).astype(np.int32)
        n, rows, cols = _read_idx_header(self._images_path, _IDX_IMAGES_MAGIC, 3)
        if n != len(self._labels):
            raise ValueError(
                f"{self._images_path} holds {n} images but {self._labels_path} holds {len(self._labels)} "
                "labels; the two files do not belong together"
            )
        if self._labels.size and self._labels.max() >= self.num_classes:
            raise ValueError(
                f"{self._labels_path}: label {self._labels.max()} >= {self.num_classes}; corrupt"
            )
        self.image_shape = (rows, cols)
        self._images: np.ndarray | None = None
        # grain reads a source from several threads at once: decode the file once, not once per thread.
        self._lock = threading.Lock()

    @staticmethod
    def _locate(split: str, data_dir) -> tuple[Path, Path]:
        if data_dir is not None:
            base = Path(data_dir).expanduser()
            dirs = [base, base / "fashion-mnist", base / "fashion_mnist"]
        else:
            dirs = [Path(d) for d in FASHION_MNIST_DIRS]
        prefix = _FASHION_MNIST_PREFIX[split]
        wanted = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
        for d in dirs:
            found = []
            for stem in wanted:
                for candidate in (d / (stem + ".gz"), d / stem):
                    if candidate.is_file():
                        found.append(candidate)
                        break
            if len(found) == 2:
                return found[0], found[1]
        raise FileNotFoundError(
            f"Fashion-MNIST {split!r} files not found: need {wanted[0]}[.gz] and {wanted[1]}[.gz]; "
            f"searched {[str(d) for d in dirs]}. Fix: `apt-get install -y dataset-fashion-mnist` "
            f"(installs them in {FASHION_MNIST_DIRS[0]}), or pass data_dir=<directory holding the four "
            "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] files>"
        )

    def _load_images(self) -> np.ndarray:
        if self._images is None:
            with self._lock:
                if self._images is None:
                    images = _read_idx(self._images_path, _IDX_IMAGES_MAGIC, 3)
                    if len(images) != len(self._labels):
                        raise ValueError(
                            f"{self._images_path}: image count changed since the source was opened"
                        )
                    self._images = images
        return self._images

    def __getstate__(self):
        # Workers re-read the file themselves: shipping a 47 MB array per worker through pickle is slower.
        state = dict(self.__dict__)
        state["_images"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        return {"image": self._load_images()[index], "label": self._labels[index]}

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def describe(self) -> dict[str, Any]:
        return {
            "name": "fashion_mnist",
            "split": self.split,
            "size": len(self),
            "num_classes": self.num_classes,
            "origin": {"images": str(self._images_path), "labels": str(self._labels_path)},
            "subset": None,
        }

    def __repr__(self) -> str:
        return f"FashionMNIST(split={self.split!r}, n={len(self)}, images={str(self._images_path)!r})"


# --------------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------------

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_SIZE = 360  # of 1,797 -> train 1,437 / test 360, exactly 20 % per class up to rounding


class Digits:
    """scikit-learn's bundled `load_digits()`: 1,797 real 8x8 handwritten digits (UCI optdigits copy).

    Pixel values 0..16 are scaled to uint8 with `round(v * 255 / 16)`. The train/test split is
    stratified (largest-remainder allocation per class) and chosen by a fixed integer hash of
    (seed, index), so it is the same on every numpy / scikit-learn version: with the defaults
    train 1,437 / test 360.
    """

    num_classes = 10
    class_names = tuple(str(i) for i in range(10))
    splits = ("train", "test", "all")

    def __init__(
        self, split: str = "train", *, seed: int = DIGITS_SPLIT_SEED, test_size: int = DIGITS_TEST_SIZE
    ):
        self.split = _check_split(split, self.splits, "digits")
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError("the digits source needs scikit-learn: `pip install scikit-learn`") from e
        data = load_digits()
        images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
        labels = data.target.astype(np.int32)
        if not 0 < test_size < len(labels):
            raise ValueError(f"test_size must lie in (0, {len(labels)}), got {test_size}")
        self.seed, self.test_size = int(seed), int(test_size)
        test_idx = _stratified_pick(labels, test_size, seed)
        if split == "all":
            idx = np.arange(len(labels), dtype=np.int64)
        elif split == "test":
            idx = test_idx
        else:
            idx = np.setdiff1d(np.arange(len(labels), dtype=np.int64), test_idx)
        self.indices = idx  # positions in load_digits() order
        self._images = np.ascontiguousarray(images[idx])
        self._labels = labels[idx]

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        return {"image": self._images[index], "label": self._labels[index]}

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def describe(self) -> dict[str, Any]:
        return {
            "name": "digits",
            "split": self.split,
            "size": len(self),
            "num_classes": self.num_classes,
            "origin": "sklearn.datasets.load_digits",
            "split_rule": {
                "seed": self.seed,
                "test_size": self.test_size,
                "stratified": True,
                "indices_sha256": indices_sha256(self.indices),
            },
            "subset": None,
        }

    def __repr__(self) -> str:
        return f"Digits(split={self.split!r}, n={len(self)})"


# --------------------------------------------------------------------------------------------------
# tensorflow-datasets (ArrayRecord builds, read without TensorFlow)
# --------------------------------------------------------------------------------------------------


class TfdsSource:
    """A tensorflow-datasets split read through `tfds.data_source` (random access, PIL decoding).

    Only ArrayRecord builds work without TensorFlow. The underlying data source is opened lazily and
    not pickled (each grain worker re-opens it). `image_key` / `label_key` pick the features.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        *,
        data_dir: str | os.PathLike | None = None,
        image_key: str = "image",
        label_key: str = "label",
    ):
        if not name:
            raise ValueError(
                "tfds source needs a dataset name, e.g. 'tfds:mnist' or 'tfds:imagenet_v2/topimages'"
            )
        self.name, self.split = name, split
        self.data_dir = None if data_dir is None else str(data_dir)
        self.image_key, self.label_key = image_key, label_key
        self._lock = threading.Lock()
        self._ds = ds = self._open()
        features = ds.dataset_info.features
        for key, what in ((image_key, "image_key"), (label_key, "label_key")):
            if key not in features:
                raise ValueError(
                    f"tfds dataset {name!r} has no feature {key!r} ({what}); its features are "
                    f"{sorted(features.keys())}. Pass {what}=<one of them>"
                )
        label_feature = features[label_key]
        self.num_classes = int(getattr(label_feature, "num_classes", 0) or 0)
        names = getattr(label_feature, "names", None)
        self.class_names = tuple(names) if names else tuple(str(i) for i in range(self.num_classes))
        self._size = len(ds)
        self._labels: np.ndarray | None = None

    def _open(self, skip_image: bool = False):
        import tensorflow_datasets as tfds

        from bob_jax.data import tiny_tfds  # noqa: F401  registers the bundled test builder

        decoders = None
        if skip_image:
            decoders = {self.image_key: tfds.decode.SkipDecoding()}
        searched = self.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets (tfds default)"
        try:
            # download=False: never start a download/prepare behind the caller's back (no network, and
            # preparing ImageNet-sized sets is a deliberate step).
            return tfds.data_source(
                self.name, split=self.split, data_dir=self.data_dir, decoders=decoders, download=False
            )
        except tfds.core.registered.DatasetNotFoundError as e:
            raise FileNotFoundError(
                f"{self.name!r} is not a registered tensorflow-datasets builder (check the spelling, e.g. "
                "'imagenet_v2/topimages'; custom builders must be imported before use)"
            ) from e
        except Exception as e:  # tfds raises several types (AssertionError, ValueError, ...) here
            raise FileNotFoundError(
                f"tfds dataset {self.name!r} split {self.split!r} could not be opened from "
                f"data_dir={searched}: {type(e).__name__}: {str(e)[:500]}. Fix: prepare it as ArrayRecord "
                f"(TensorFlow is not needed to read it): "
                f"`tfds build {self.name} --file_format=array_record --data_dir=<dir>` or "
                f"`tfds.builder({self.name!r}, data_dir=<dir>, file_format='array_record')"
                ".download_and_prepare()`, then pass data_dir=<dir>. TFRecord builds must be re-prepared."
            ) from e

    def _source(self):
        if self._ds is None:
            # grain calls sources from several threads; opening (first tfds import included) must
            # happen once: concurrent first imports of tfds' lazily imported modules can deadlock.
            with self._lock:
                if self._ds is None:
                    self._ds = self._open()
        return self._ds

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ds"] = None  # file handles do not pickle; workers re-open
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        # Re-open while unpickling (a grain worker's main thread, before its reader threads start).
        self._source()

    def __len__(self) -> int:
        return self._size

    def _convert(self, ex) -> dict[str, Any]:
        image = np.asarray(ex[self.image_key])
        if image.dtype != np.uint8:
            raise ValueError(
                f"tfds {self.name!r}: feature {self.image_key!r} decoded to {image.dtype}, expected uint8"
            )
        return {"image": image, "label": np.int32(ex[self.label_key])}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._convert(self._source()[int(index)])

    def _getitems(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        # Batched reads are much faster on ArrayRecord; grain calls `_getitems` when a source has it
        # (grain's SupportsBatchedReadRandomAccessDataSource protocol).
        return [self._convert(ex) for ex in self._source().__getitems__([int(i) for i in indices])]

    __getitems__ = _getitems

    def labels(self) -> np.ndarray:
        """All labels, read with image decoding skipped (cached)."""
        if self._labels is None:
            with self._lock:
                ds = self._open(skip_image=True)
            out = np.empty((self._size,), np.int32)
            chunk = 4096
            for start in range(0, self._size, chunk):
                idx = list(range(start, min(start + chunk, self._size)))
                out[start : start + len(idx)] = [ex[self.label_key] for ex in ds.__getitems__(idx)]
            self._labels = out
        return self._labels.copy()

    def describe(self) -> dict[str, Any]:
        info = self._source().dataset_info
        return {
            "name": f"tfds:{self.name}",
            "split": self.split,
            "size": len(self),
            "num_classes": self.num_classes,
            "origin": {
                "data_dir": str(info.data_dir),
                "version": str(info.version),
                "image_key": self.image_key,
                "label_key": self.label_key,
            },
            "subset": None,
        }

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)})"


# --------------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def _init_pil() -> None:
    # Import PIL and register its format plugins up front, in one thread: grain decodes from several
    # reader threads, and first-time imports racing across threads are best avoided.
    from PIL import Image

    Image.init()


class ImageDecodeError(OSError):
    """An image file could not be read or decoded (the message names the file)."""


def read_rgb(path: str | os.PathLike):
    """The image at `path` as a fully decoded RGB PIL image; any failure is an ImageDecodeError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() forces the full decode inside the try
    except Exception as e:
        raise ImageDecodeError(f"cannot decode image {str(path)!r}: {type(e).__name__}: {e}") from e


class ImageFolder:
    """torchvision-style ImageFolder: `root/<class>/**/<image>`; classes and files sorted.

    Images are decoded lazily with PIL and converted to RGB (`.convert("RGB")`, like torchvision's
    loader). With `split`, `root/<split>` is used when that directory exists, else `root` itself.
    """

    def __init__(self, root: str | os.PathLike, split: str | None = None, *, extensions=IMAGE_EXTENSIONS):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder root {str(root)!r} is not a directory")
        if split and (root / split).is_dir():
            root = root / split
        self.root, self.split = root, split
        exts = tuple(e.lower() for e in extensions)
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise FileNotFoundError(
                f"image folder {str(root)!r} has no class sub-directories; expected root/<class>/<images>"
            )
        files, labels, empty = [], [], []
        for ci, cname in enumerate(classes):
            found = []
            for dirpath, dirnames, filenames in os.walk(root / cname, followlinks=True):
                dirnames.sort()
                for fn in sorted(filenames):
                    if fn.lower().endswith(exts) and not fn.startswith("."):
                        found.append(os.path.relpath(os.path.join(dirpath, fn), root))
            if not found:
                empty.append(cname)
            files.extend(found)
            labels.extend([ci] * len(found))
        if empty:
            raise FileNotFoundError(
                f"image folder {str(root)!r}: no image files ({', '.join(exts)}) in class directories "
                f"{empty}; remove them or add images"
            )
        self.class_names = tuple(classes)
        self.num_classes = len(classes)
        self.files = tuple(files)  # relative to root
        self._labels = np.asarray(labels, np.int32)
        _init_pil()

    def __setstate__(self, state):
        self.__dict__.update(state)
        _init_pil()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        image = np.asarray(read_rgb(self.root / self.files[index]))
        return {"image": image, "label": self._labels[index], "name": self.files[index]}

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def names(self) -> tuple[str, ...]:
        """File paths relative to the root (`<class>/<file>`), in item order (class-folder retrieval)."""
        return self.files

    def describe(self) -> dict[str, Any]:
        return {
            "name": f"folder:{self.root}",
            "split": self.split,
            "size": len(self),
            "num_classes": self.num_classes,
            "origin": {
                "root": str(self.root),
                "files_sha256": hashlib.sha256("\n".join(self.files).encode()).hexdigest(),
            },
            "subset": None,
        }

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, n={len(self)}, classes={self.num_classes})"


# --------------------------------------------------------------------------------------------------
# Subsets
# --------------------------------------------------------------------------------------------------


class Subset:
    """`source` restricted to `indices` (in the given order); `info` is recorded in `describe()`."""

    def __init__(self, source, indices: Sequence[int] | np.ndarray, info: dict[str, Any] | None = None):
        idx = np.asarray(indices)
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise ValueError(
                f"Subset indices must be a 1-D integer sequence, got shape {idx.shape} {idx.dtype}"
            )
        idx = idx.astype(np.int64)
        n = len(source)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"Subset indices must lie in [0, {n}), got range [{idx.min()}, {idx.max()}]")
        self.source, self.indices = source, idx
        self.num_classes = source.num_classes
        self.class_names = source.class_names
        self.info = dict(info or {})

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[int(self.indices[int(index)])]

    def _getitems(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return read_many(self.source, [int(self.indices[int(i)]) for i in indices])

    def labels(self) -> np.ndarray:
        return self.source.labels()[self.indices]

    def names(self) -> tuple[str, ...]:
        names = self.source.names()  # AttributeError for a source without file names
        return tuple(names[i] for i in self.indices)

    def describe(self) -> dict[str, Any]:
        desc = dict(self.source.describe())
        desc["size"] = len(self)
        desc["subset"] = {
            "n": len(self),
            "indices_sha256": indices_sha256(self.indices),
            **self.info,
            "parent": desc.get("subset"),
        }
        return desc

    def __repr__(self) -> str:
        return f"Subset({self.source!r}, n={len(self)})"


def seeded_subset(source, n: int, *, seed: int, stratified: bool = True) -> Subset:
    """`n` examples of `source` chosen by `seed` (sorted indices, version-independent).

    stratified=True keeps class proportions (largest-remainder allocation per class, so per-class
    counts differ from exact proportions by less than one).
    """
    total = len(source)
    if not 0 <= n <= total:
        raise ValueError(f"seeded_subset: n must lie in [0, {total}] for this source, got {n}")
    if stratified:
        idx = _stratified_pick(source.labels(), n, seed)
    else:
        idx = np.sort(_seeded_order(np.arange(total, dtype=np.int64), seed)[:n])
    return Subset(source, idx, info={"seed": int(seed), "stratified": bool(stratified), "rule": "splitmix64"})


# --------------------------------------------------------------------------------------------------
# Lookup by name
# --------------------------------------------------------------------------------------------------


def get_source(spec: str, split: str = "train", *, data_dir: str | os.PathLike | None = None, **kwargs):
    """Build a source from a name: 'fashion_mnist', 'digits', 'tfds:<name>', 'folder:<root>',
    'revisited:<roxford5k|rparis6k>' (data_dir holds revisitop's layout; split 'bob' or 'official'), or a
    benchmark dataset name ('cifar100', 'bench:cifar100'; `bob_jax.data.datasets.list_datasets()`).

    `data_dir`: Fashion-MNIST file directory, tfds data_dir, or the folder root when 'folder' has no
    path (benchmark datasets: see `datasets.get_dataset`). Extra keyword arguments go to the source
    class (e.g. image_key= for tfds, seed= for digits, n_shot= for benchmark datasets).
    """
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower().replace("-", "_")
    if kind == "fashion_mnist" and not arg:
        return FashionMNIST(split, data_dir=data_dir, **kwargs)
    if kind == "digits" and not arg:
        return Digits(split, **kwargs)
    if kind == "shapes" and not arg:
        from bob_jax.data.shapes import ShapesMultilabel

        return ShapesMultilabel(split, **kwargs)
    if kind == "tfds":
        return TfdsSource(arg, split, data_dir=data_dir, **kwargs)
    if kind == "folder":
        root = arg or data_dir
        if not root:
            raise ValueError("folder source needs a root: 'folder:/path/to/root' or data_dir=...")
        return ImageFolder(root, split, **kwargs)
    if kind == "revisited":
        from bob_jax.data.revisited import RevisitedSource

        return RevisitedSource.from_split(data_dir, arg, split, **kwargs)
    # Benchmark registry last, so the names above keep their meaning (imported here: datasets imports us).
    from bob_jax.data import datasets

    name = arg if kind == "bench" else spec
    if datasets.resolve_name(name) is not None:
        return datasets.get_dataset(name, split, data_dir=data_dir, **kwargs)
    raise ValueError(
        f"unknown data source {spec!r}; known: {', '.join(KNOWN_SOURCES)}; benchmark datasets: "
        f"{', '.join(datasets.list_datasets())}"
    )
