"""Sources on real data: Fashion-MNIST (Debian package), sklearn digits, a tiny tfds build, ImageFolder."""

import gzip
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bob_jax.data import sources as S

FMNIST_DIR = Path(S.FASHION_MNIST_DIRS[0])
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install -y dataset-fashion-mnist",
)


@pytest.fixture(scope="module")
def fmnist_train():
    return S.FashionMNIST("train")


@pytest.fixture(scope="module")
def fmnist_test():
    return S.FashionMNIST("test")


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------------


@needs_fmnist
def test_fashion_mnist_installed_counts(fmnist_train, fmnist_test):
    assert len(fmnist_train) == 60000 and len(fmnist_test) == 10000
    assert fmnist_train.num_classes == 10 and fmnist_train.class_names[9] == "Ankle boot"
    np.testing.assert_array_equal(np.bincount(fmnist_train.labels(), minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(fmnist_test.labels(), minlength=10), [1000] * 10)
    # First labels of the published files (Zalando's README: the first training image is an ankle boot).
    np.testing.assert_array_equal(fmnist_train.labels()[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
    ex = fmnist_test[0]
    assert ex["image"].shape == (28, 28) and ex["image"].dtype == np.uint8
    assert ex["label"].dtype == np.int32 and int(ex["label"]) == 9
    assert int(fmnist_test[0]["image"].sum()) == 33456  # a content fingerprint of the real file
    desc = fmnist_train.describe()
    assert desc["name"] == "fashion_mnist" and desc["size"] == 60000 and desc["split"] == "train"
    assert desc["origin"]["images"].endswith("train-images-idx3-ubyte.gz")


@needs_fmnist
def test_fashion_mnist_pickles_without_images(fmnist_test):
    fmnist_test[0]  # decode the image array
    blob = pickle.dumps(fmnist_test)
    assert len(blob) < 200_000  # 10,000 labels, not 7.8 MB of pixels
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone[1234]["image"], fmnist_test[1234]["image"])


@needs_fmnist
def test_fashion_mnist_from_gunzipped_copy(tmp_path, fmnist_test):
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(FMNIST_DIR / f"{stem}.gz", "rb") as fin, open(tmp_path / stem, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    src = S.get_source("fashion_mnist", "test", data_dir=tmp_path)
    assert len(src) == 10000
    assert src.describe()["origin"]["images"] == str(tmp_path / "t10k-images-idx3-ubyte")
    np.testing.assert_array_equal(src.labels(), fmnist_test.labels())
    for i in (0, 4321, 9999):
        np.testing.assert_array_equal(src[i]["image"], fmnist_test[i]["image"])
    # Only the test split was copied: asking for train names the missing files.
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        S.FashionMNIST("train", data_dir=tmp_path)


def test_fashion_mnist_missing_files_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        S.FashionMNIST("test", data_dir=tmp_path)
    msg = str(err.value)
    for needle in (
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        str(tmp_path),
        "apt-get install -y dataset-fashion-mnist",
        "data_dir",
    ):
        assert needle in msg
    with pytest.raises(ValueError, match="splits"):
        S.FashionMNIST("validation", data_dir=tmp_path)


def _write_idx(path, magic, dims, payload: bytes, gz=True):
    raw = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def test_fashion_mnist_corrupt_files(tmp_path):
    images, labels = tmp_path / "t10k-images-idx3-ubyte.gz", tmp_path / "t10k-labels-idx1-ubyte.gz"
    good_labels = bytes([1, 2, 3])
    # Wrong magic number in the label file (e.g. the files swapped).
    _write_idx(labels, 0x803, (3,), good_labels)
    _write_idx(images, 0x803, (3, 2, 2), bytes(12))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz.*magic"):
        S.FashionMNIST("test", data_dir=tmp_path)
    # Truncated image payload: detected when the images are first read, naming the file.
    _write_idx(labels, 0x801, (3,), good_labels)
    _write_idx(images, 0x803, (3, 2, 2), bytes(11))
    src = S.FashionMNIST("test", data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz.*truncated"):
        src[0]
    # Not gzip at all.
    images.write_bytes(b"this is not a gzip file")
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz.*corrupt"):
        S.FashionMNIST("test", data_dir=tmp_path)
    # Image / label counts disagree.
    _write_idx(images, 0x803, (4, 2, 2), bytes(16))
    with pytest.raises(ValueError, match="do not belong together"):
        S.FashionMNIST("test", data_dir=tmp_path)
    # A valid tiny pair (uncompressed) reads back exactly.
    images.unlink()
    labels.unlink()
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", 0x803, (3, 2, 2), bytes(range(12)), gz=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", 0x801, (3,), good_labels, gz=False)
    src = S.FashionMNIST("test", data_dir=tmp_path)
    np.testing.assert_array_equal(src[2]["image"], [[8, 9], [10, 11]])
    assert int(src[2]["label"]) == 3


# --------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------


def test_digits_split_sizes_and_determinism():
    from sklearn.datasets import load_digits

    train, test, full = S.Digits("train"), S.Digits("test"), S.Digits("all")
    assert (len(train), len(test), len(full)) == (1437, 360, 1797)
    assert not set(train.indices) & set(test.indices)
    assert sorted(set(train.indices) | set(test.indices)) == list(range(1797))
    # Stratified: every class holds 20 % of its examples in test, up to one.
    counts = np.bincount(full.labels())
    assert np.all(np.abs(np.bincount(test.labels()) - counts * 360 / 1797) < 1)
    # The split is pinned: a change here changes every digits result.
    assert test.describe()["split_rule"]["indices_sha256"] == (
        "c31c6709fe4b35891fd1f7c502922e826ef6124c01ea64785e1827ad5fb91040"
    )
    assert S.Digits("test").describe() == test.describe()
    assert (
        S.Digits("test", seed=1).describe()["split_rule"]["indices_sha256"]
        != (test.describe()["split_rule"]["indices_sha256"])
    )
    raw = load_digits()
    i = 17
    ex = test[i]
    assert ex["image"].shape == (8, 8) and ex["image"].dtype == np.uint8
    np.testing.assert_array_equal(
        ex["image"], np.round(raw.images[test.indices[i]] * 255 / 16).astype(np.uint8)
    )
    assert int(ex["label"]) == raw.target[test.indices[i]]
    assert full.labels().max() == 9 and max(int(full[j]["image"].max()) for j in range(50)) == 255


# --------------------------------------------------------------------------------------------------
# tfds
# --------------------------------------------------------------------------------------------------


def test_tfds_tiny_builder_roundtrip(tiny_tfds_dir):
    from bob_jax.data.tiny_tfds import TEST_SIZE, TRAIN_SIZE, tiny_digit_image

    for split, n in (("train", TRAIN_SIZE), ("test", TEST_SIZE)):
        src = S.get_source("tfds:bob_tiny_digits", split, data_dir=tiny_tfds_dir)
        digits = S.Digits(split)
        assert len(src) == n and src.num_classes == 10 and src.class_names[3] == "3"
        np.testing.assert_array_equal(src.labels(), digits.labels()[:n])
        for i in (0, n // 2, n - 1):
            ex = src[i]
            assert ex["image"].shape == (16, 16, 1) and ex["image"].dtype == np.uint8
            np.testing.assert_array_equal(ex["image"], tiny_digit_image(digits[i]["image"]))
            assert int(ex["label"]) == int(digits[i]["label"]) and ex["label"].dtype == np.int32
    desc = src.describe()
    assert (
        desc["name"] == "tfds:bob_tiny_digits"
        and desc["size"] == TEST_SIZE
        and desc["origin"]["version"] == "1.0.0"
    )
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone[5]["image"], src[5]["image"])
    # Batched reads (grain's `_getitems`, also through a Subset) return the same examples.
    many = S.read_many(S.Subset(src, [7, 3, 50]), [0, 2, 1])
    for ex, i in zip(many, (7, 50, 3), strict=True):
        np.testing.assert_array_equal(ex["image"], src[i]["image"])
        assert ex["label"] == src[i]["label"]


def test_tfds_errors(tmp_path, tiny_tfds_dir):
    with pytest.raises(FileNotFoundError) as err:
        S.get_source("tfds:bob_tiny_digits", "train", data_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "file_format=array_record" in msg and "tfds build bob_tiny_digits" in msg
    with pytest.raises(FileNotFoundError, match="not a registered tensorflow-datasets builder"):
        S.get_source("tfds:no_such_dataset_xyz", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="no feature 'img'.*'image'"):
        S.get_source("tfds:bob_tiny_digits", "train", data_dir=tiny_tfds_dir, image_key="img")
    with pytest.raises(ValueError, match="dataset name"):
        S.get_source("tfds:", "train")


# --------------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def image_tree(tmp_path, sample_images):
    root = tmp_path / "root"
    (root / "cat" / "nested").mkdir(parents=True)
    (root / "coffee").mkdir()
    (root / "camera").mkdir()
    Image.fromarray(sample_images["chelsea"]).save(root / "cat" / "b.png")
    Image.fromarray(sample_images["chelsea"][:200, :300]).save(root / "cat" / "a.JPG", quality=90)
    Image.fromarray(sample_images["chelsea"][::2, ::2]).save(root / "cat" / "nested" / "c.png")
    Image.fromarray(sample_images["coffee"]).save(root / "coffee" / "x.jpeg", quality=90)
    Image.fromarray(sample_images["camera"][:128, :96]).save(root / "camera" / "grey.png")  # mode L
    (root / "coffee" / "notes.txt").write_text("not an image, ignored")
    (root / ".hidden").mkdir()  # hidden directories are not classes
    return root


def test_folder_source(image_tree, sample_images):
    src = S.get_source(f"folder:{image_tree}", "train")  # no root/train: the root itself is used
    assert src.class_names == ("camera", "cat", "coffee")
    assert src.files == ("camera/grey.png", "cat/a.JPG", "cat/b.png", "cat/nested/c.png", "coffee/x.jpeg")
    np.testing.assert_array_equal(src.labels(), [0, 1, 1, 1, 2])
    ex = src[2]
    np.testing.assert_array_equal(ex["image"], sample_images["chelsea"])  # PNG is lossless
    assert int(ex["label"]) == 1 and ex["name"] == "cat/b.png"
    grey = src[0]["image"]
    assert grey.shape == (128, 96, 3)
    np.testing.assert_array_equal(grey[..., 1], sample_images["camera"][:128, :96])
    with Image.open(image_tree / "coffee" / "x.jpeg") as im:
        np.testing.assert_array_equal(src[4]["image"], np.asarray(im.convert("RGB")))
    assert src.describe()["size"] == 5
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone[3]["image"], src[3]["image"])


def test_folder_split_subdir_and_errors(tmp_path, image_tree):
    # root/<split> is used when it exists.
    split_root = tmp_path / "splits"
    shutil.copytree(image_tree, split_root / "val")
    assert len(S.ImageFolder(split_root, "val")) == 5
    # Corrupt image: the error names the file.
    (image_tree / "cat" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    src = S.ImageFolder(image_tree)
    with pytest.raises(S.ImageDecodeError, match=r"cat/b\.png"):
        src[2]
    # Truncated JPEG.
    data = (image_tree / "coffee" / "x.jpeg").read_bytes()
    (image_tree / "coffee" / "x.jpeg").write_bytes(data[: len(data) // 3])
    with pytest.raises(S.ImageDecodeError, match=r"coffee/x\.jpeg"):
        src[4]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no class sub-directories"):
        S.ImageFolder(empty)
    (empty / "dog").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no image files.*\['dog'\]"):
        S.ImageFolder(empty)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        S.ImageFolder(tmp_path / "missing")


# --------------------------------------------------------------------------------------------------
# Subsets and lookup
# --------------------------------------------------------------------------------------------------


def test_seeded_subset_determinism_and_describe():
    src = S.Digits("train")
    a = S.seeded_subset(src, 100, seed=7)
    b = S.seeded_subset(src, 100, seed=7)
    c = S.seeded_subset(src, 100, seed=8)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)
    assert len(a) == 100 and np.all(np.diff(a.indices) > 0)
    counts = np.bincount(src.labels(), minlength=10)
    assert np.all(np.abs(np.bincount(a.labels(), minlength=10) - counts * 100 / len(src)) < 1)
    desc = a.describe()
    assert desc["name"] == "digits" and desc["size"] == 100
    assert desc["subset"]["seed"] == 7 and desc["subset"]["n"] == 100 and desc["subset"]["stratified"]
    assert desc["subset"]["indices_sha256"] == S.indices_sha256(a.indices)
    assert desc["subset"]["indices_sha256"] != c.describe()["subset"]["indices_sha256"]
    np.testing.assert_array_equal(a[3]["image"], src[int(a.indices[3])]["image"])
    np.testing.assert_array_equal(a.labels(), src.labels()[a.indices])
    # Pinned: the selection rule does not depend on numpy's or sklearn's RNG implementations.
    np.testing.assert_array_equal(
        S.seeded_subset(src, 5, seed=0, stratified=False).indices, [250, 286, 781, 1076, 1127]
    )
    plain = S.seeded_subset(src, 50, seed=7, stratified=False)
    assert len(set(plain.indices)) == 50 and plain.describe()["subset"]["stratified"] is False
    # Subset of a subset keeps the chain.
    nested = S.seeded_subset(a, 10, seed=1)
    assert nested.describe()["subset"]["parent"]["seed"] == 7
    assert S.seeded_subset(src, len(src), seed=3).indices.tolist() == list(range(len(src)))


def test_subset_errors():
    src = S.Digits("test")
    with pytest.raises(ValueError, match=r"n must lie in \[0, 360\]"):
        S.seeded_subset(src, 361, seed=0)
    with pytest.raises(IndexError, match=r"\[0, 360\)"):
        S.Subset(src, [0, 360])
    with pytest.raises(ValueError, match="1-D integer"):
        S.Subset(src, [[1, 2]])


def test_get_source_names(tmp_path):
    assert isinstance(S.get_source("digits", "test"), S.Digits)
    with pytest.raises(FileNotFoundError, match="fashion-mnist"):  # alias spelling reaches FashionMNIST
        S.get_source("Fashion-MNIST", "test", data_dir=tmp_path)
    with pytest.raises(
        ValueError, match=r"unknown data source 'imagenet'.*fashion_mnist.*digits.*tfds:.*folder:"
    ):
        S.get_source("imagenet", "train")
    with pytest.raises(ValueError, match="needs a root"):
        S.get_source("folder", "train")
    with pytest.raises(ValueError, match="splits"):
        S.get_source("digits", "validation")
