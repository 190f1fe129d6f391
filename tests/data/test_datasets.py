"""Benchmark dataset registry (bob_jax.data.datasets): specs, tfds paths, split rules, folder layouts.

TFDS coverage: the sets are not prepared here (ImageNet alone is 150 GB), so each tfds-backed spec is read
through `tfds.testing.mock_data(policy=USE_CODE)`, which tensorflow-datasets 4.9.10 supports for
`tfds.data_source`: the real registered builder (name/config, features, ClassLabel size) behind
`TfdsSource` -> `BenchmarkSource`, with random examples. Two gaps of that mock are filled in the fixture:
its batched `__getitems__` is installed unbound (TypeError: missing 'record_keys'), and the image-skipping
decode used by `TfdsSource.labels()` re-encodes mock images with `tf.image` (needs TensorFlow). USE_CODE
accepts any split name, so `test_tfds_physical_splits_and_classes_match_builders` checks our physical
split names against the split tables of tfds's own builder tests. The real ArrayRecord read path is
covered by tests/data/test_data_sources.py (bob_tiny_digits).
"""

import hashlib
import io
import json
import pickle
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bob_jax.data import datasets as D
from bob_jax.data import sources as S
from bob_jax.data.imagenet_ood_classes import OOD_CLASS_LISTS, valid_class_indices

TFDS_SPECS = [spec for spec in D.DATASETS.values() if spec.backend == "tfds"]
FOLDER_SPECS = [spec for spec in D.DATASETS.values() if spec.backend != "tfds"]

# --------------------------------------------------------------------------------------------------
# Independent re-implementations of the split rules (plain Python integers and fractions)
# --------------------------------------------------------------------------------------------------

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _hash_order(indices, seed: int) -> list[int]:
    """indices sorted by splitmix64(splitmix64(seed) ^ index), ties by input position."""
    key = _splitmix64(seed & _M64)
    return [i for _, _, i in sorted((_splitmix64(key ^ i), pos, i) for pos, i in enumerate(indices))]


def _hamilton(counts: dict[int, int], total: int) -> dict[int, int]:
    """Largest-remainder allocation of `total` over classes, exact fractions, ties to the lower class."""
    n = sum(counts.values())
    quota = {c: Fraction(k * total, n) for c, k in counts.items()}
    alloc = {c: int(q) for c, q in quota.items()}
    leftover = total - sum(alloc.values())
    for c in sorted(counts, key=lambda c: (-(quota[c] - alloc[c]), c))[:leftover]:
        alloc[c] += 1
    return alloc


def _by_class(labels) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        out.setdefault(label, []).append(i)
    return out


class ArraySource:
    """Minimal in-memory source (labels only) for the subset rules."""

    def __init__(self, labels, num_classes, class_names=None):
        self._labels = np.asarray(labels, np.int32)
        self.num_classes = num_classes
        self.class_names = tuple(class_names or [f"c{i}" for i in range(num_classes)])

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, i):
        return {"image": np.zeros((2, 2, 3), np.uint8), "label": self._labels[i]}

    def labels(self):
        return self._labels.copy()

    def describe(self):
        return {"name": "array", "split": "train", "size": len(self), "subset": None}


# --------------------------------------------------------------------------------------------------
# Mocked tensorflow-datasets
# --------------------------------------------------------------------------------------------------


def _mock_getitems(record_keys, generator, serialized=False):
    assert not serialized, "serialized reads are not used by TfdsSource"
    return [generator[k] for k in record_keys]


def _png_encode(self, np_image):
    buf = io.BytesIO()
    Image.fromarray(np_image[..., 0] if np_image.shape[-1] == 1 else np_image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def mock_tfds(monkeypatch):
    """`with mock_tfds(n):` -> every tfds dataset has n random examples in every split (see module doc)."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.features import image_feature
    from tensorflow_datasets.testing import mocking

    monkeypatch.setattr(mocking, "_getitems", _mock_getitems)
    monkeypatch.setattr(image_feature._ImageEncoder, "_encode_image", _png_encode)

    def enter(num_examples: int):
        return tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE)

    return enter


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def test_registry_specs_and_records():
    required = {
        "imagenet2012",
        "imagenet2012_subset/1pct",
        "imagenet2012_subset/10pct",
        "cifar100",
        "oxford_flowers102",
        "eurosat",
        "imagenet_v2",
        "imagenet_a",
        "imagenet_r",
        "imagenet_sketch",
        "fgvc_aircraft",
        "chexpert",
        "visda2017",
        "cub200_2011",
        "instre_s1",
        "objectnet",
    }
    assert set(D.list_datasets()) == required and D.list_datasets() == sorted(required)
    for name, spec in D.DATASETS.items():
        assert spec.name == name and spec.eval_split in spec.splits
        assert set(spec.splits) <= {"train", "val", "test", "all"}
        assert (spec.backend == "tfds") == (spec.tfds_name is not None)
        assert spec.prepare.strip()
        for split in spec.splits:
            record = spec.record(split)
            assert json.loads(json.dumps(record)) == record  # JSON-able, results store ready
            assert record["physical_split"] == spec.splits[split] and record["eval_split"] == spec.eval_split
    # BoB's evaluation splits (bob-spec 3.1, 5.2, 7.5).
    flowers = D.DATASETS["oxford_flowers102"]
    assert flowers.eval_split == "val" and flowers.splits == {
        "train": "train",
        "val": "validation",
        "test": "test",
    }
    assert D.DATASETS["fgvc_aircraft"].eval_split == "val" and "test" in D.DATASETS["fgvc_aircraft"].splits
    assert D.DATASETS["cifar100"].splits == {"train": "train", "test": "test"}
    assert D.DATASETS["cifar100"].eval_split == "test"
    assert D.DATASETS["imagenet2012"].splits["val"] == "validation"
    assert D.DATASETS["imagenet_v2"].tfds_name == "imagenet_v2/matched-frequency"
    assert (
        D.DATASETS["eurosat"].tfds_name == "eurosat/rgb" and D.DATASETS["eurosat"].holdout["fraction"] == 0.2
    )
    assert D.DATASETS["chexpert"].multilabel and D.DATASETS["chexpert"].num_classes == 5
    # ImageNet-A/R logit masks are the shipped 200-class lists; no other set restricts logits.
    for name in ("imagenet_a", "imagenet_r"):
        mask = D.DATASETS[name].logit_mask
        np.testing.assert_array_equal(mask, valid_class_indices(name))
        assert mask.shape == (200,)
        record = D.DATASETS[name].record("test")["logit_mask"]
        assert record == {"list": name, "size": 200, "sha256": OOD_CLASS_LISTS[name][1]}
    assert all(
        s.logit_mask is None for s in D.DATASETS.values() if s.name not in ("imagenet_a", "imagenet_r")
    )
    assert D.DATASETS["objectnet"].protocol == {"query_fraction": 0.2, "max_per_class": 50}
    # Aliases (BoB's dataset arguments, tfds names), case and '-' insensitive.
    assert D.resolve_name("Flowers102") == "oxford_flowers102"
    assert D.resolve_name("eurosat/rgb") == "eurosat" and D.resolve_name("aircraft") == "fgvc_aircraft"
    assert D.resolve_name("imagenet_v2/matched-frequency") == "imagenet_v2"
    assert D.resolve_name("CIFAR-100") is None and D.resolve_name("imagenet") is None
    assert set(D.ALIASES.values()) <= set(D.DATASETS)
    with pytest.raises(ValueError, match="unknown benchmark dataset 'nope'.*cifar100"):
        D.get_spec("nope")


def _builder_test_split_names(builder) -> set[str]:
    import inspect

    test_file = Path(inspect.getsourcefile(type(builder))).with_suffix("")
    test_file = test_file.with_name(test_file.name + "_test.py")
    assert test_file.is_file(), f"tfds ships no builder test {test_file} to read split names from"
    names = set()
    for block in re.findall(r"SPLITS\s*=\s*\{([^}]*)\}", test_file.read_text()):
        names |= set(re.findall(r"[\"'](\w+)[\"']\s*:", block))
    assert names, test_file
    return names


def test_tfds_physical_splits_and_classes_match_builders():
    import tensorflow_datasets as tfds

    for spec in TFDS_SPECS:
        builder = tfds.builder(spec.tfds_name)  # registered builder; no data needed
        features = builder.info.features
        assert "image" in features and features["label"].num_classes == spec.num_classes, spec.name
        physical = set(spec.splits.values())
        assert physical <= _builder_test_split_names(builder), (spec.name, physical)


# --------------------------------------------------------------------------------------------------
# TFDS-backed datasets through tfds.testing.mock_data
# --------------------------------------------------------------------------------------------------

TFDS_CASES = [(spec.name, split) for spec in TFDS_SPECS for split in spec.splits]


@pytest.mark.parametrize("name,split", TFDS_CASES)
def test_tfds_dataset_through_mock(mock_tfds, name, split):
    spec = D.DATASETS[name]
    n = 40
    with mock_tfds(n):
        src = D.get_dataset(name, split)
        expected_len = n
        if spec.holdout:
            held = round(spec.holdout["fraction"] * n)
            expected_len = held if spec.holdout["parts"][split] == "holdout" else n - held
        assert len(src) == expected_len and src.num_classes == spec.num_classes
        assert len(src.class_names) == spec.num_classes
        labels = src.labels()
        assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < spec.num_classes
        items = S.read_many(src, range(len(src)))
        np.testing.assert_array_equal([int(ex["label"]) for ex in items], labels)
        image = src[1]["image"]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
        desc = src.describe()
        assert json.loads(json.dumps(desc)) == desc
        assert desc["name"] == name and desc["split"] == split and desc["size"] == len(src)
        assert desc["backend"] == f"tfds:{spec.tfds_name}"
        assert desc["dataset"]["physical_split"] == spec.splits[split]
        assert desc["dataset"]["eval_split"] == spec.eval_split
        if spec.logit_mask_list:
            np.testing.assert_array_equal(src.logit_mask, valid_class_indices(spec.logit_mask_list))
        # The same source through sources.get_source, by name and with the bench: prefix.
        for spec_str in (name, f"bench:{name}", name.upper()):
            other = S.get_source(spec_str, split)
            assert other.describe() == desc
        clone = pickle.loads(pickle.dumps(src))  # grain workers pickle sources
        np.testing.assert_array_equal(clone.labels(), labels)
        np.testing.assert_array_equal(clone[2]["image"], src[2]["image"])


def test_eurosat_holdout_rule(mock_tfds):
    n = 300
    with mock_tfds(n):
        full_labels = S.TfdsSource("eurosat/rgb", "train").labels()
        train, val = D.get_dataset("eurosat", "train"), D.get_dataset("eurosat", "val")
        train2, val2 = D.get_dataset("eurosat", "train"), D.get_dataset("eurosat", "val")
        tr, va = train.source.indices, val.source.indices
        # Disjoint, covering, sorted, deterministic.
        assert not set(tr.tolist()) & set(va.tolist())
        np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), np.arange(n))
        assert np.all(np.diff(tr) > 0) and np.all(np.diff(va) > 0)
        np.testing.assert_array_equal(tr, train2.source.indices)
        np.testing.assert_array_equal(va, val2.source.indices)
        # Stratified: per class, Hamilton's allocation of 60 held-out examples, chosen in hash order (seed 0).
        members = _by_class(full_labels)
        alloc = _hamilton({c: len(m) for c, m in members.items()}, 60)
        expected_val = sorted(i for c, m in members.items() for i in _hash_order(m, 0)[: alloc[c]])
        assert va.tolist() == expected_val
        np.testing.assert_array_equal(val.labels(), full_labels[va])
        assert int(val[3]["label"]) == full_labels[va[3]]
        # Recorded: rule, part, seed, fraction, and the hashes of the chosen indices.
        for src, part, idx in ((train, "rest", tr), (val, "holdout", va)):
            desc = src.describe()
            sub = desc["subset"]
            assert sub["rule"] == "stratified_holdout" and sub["part"] == part
            assert sub["seed"] == 0 and sub["fraction"] == 0.2
            assert sub["indices_sha256"] == hashlib.sha256(np.asarray(idx, "<i8").tobytes()).hexdigest()
            assert sub["holdout_sha256"] == hashlib.sha256(np.asarray(va, "<i8").tobytes()).hexdigest()
            assert desc["dataset"]["holdout"]["fraction"] == 0.2
            assert desc["dataset"]["physical_split"] == "train"
    # A different seed gives a different hold-out of the same class sizes.
    other = D.stratified_holdout(ArraySource(full_labels, 10), "holdout", fraction=0.2, seed=1)
    assert other.indices.tolist() != expected_val
    np.testing.assert_array_equal(
        np.bincount(full_labels[other.indices], minlength=10), np.bincount(full_labels[va], minlength=10)
    )


def test_get_dataset_n_shot_on_tfds_split(mock_tfds):
    with mock_tfds(200):
        shots = D.get_dataset("eurosat", "train", n_shot=3)
        train = D.get_dataset("eurosat", "train")
        np.testing.assert_array_equal(np.bincount(shots.labels(), minlength=10), [3] * 10)
        assert set(shots.indices.tolist()) <= set(range(len(train)))
        desc = shots.describe()
        assert desc["name"] == "eurosat" and desc["size"] == 30
        assert desc["subset"]["rule"] == "few_shot" and desc["subset"]["k_per_class"] == 3
        assert desc["subset"]["parent"]["rule"] == "stratified_holdout"  # nested record of both rules
        assert desc["subset"]["parent"]["part"] == "rest"
        again = S.get_source("eurosat", "train", n_shot=3)
        np.testing.assert_array_equal(again.indices, shots.indices)
        seed1 = D.get_dataset("eurosat", "train", n_shot=3, seed=1)
        assert seed1.indices.tolist() != shots.indices.tolist()


# --------------------------------------------------------------------------------------------------
# Few-shot subsets
# --------------------------------------------------------------------------------------------------


def test_few_shot_k_per_class():
    src = S.Digits("train")
    labels = src.labels()
    sub = D.few_shot_subset(src, 5, seed=0)
    members = _by_class(labels)
    expected = sorted(i for c in range(10) for i in _hash_order(members[c], 0)[:5])
    assert sub.indices.tolist() == expected
    np.testing.assert_array_equal(np.bincount(sub.labels(), minlength=10), [5] * 10)
    np.testing.assert_array_equal(D.few_shot_subset(src, 5, seed=0).indices, sub.indices)
    seed3 = D.few_shot_subset(src, 5, seed=3)
    assert seed3.indices.tolist() == sorted(i for c in range(10) for i in _hash_order(members[c], 3)[:5])
    assert seed3.indices.tolist() != expected
    info = sub.describe()["subset"]
    assert info["rule"] == "few_shot" and info["n_shot"] == 5 and info["k_per_class"] == 5
    assert info["seed"] == 0 and info["n"] == 50
    assert info["indices_sha256"] == hashlib.sha256(np.asarray(expected, "<i8").tobytes()).hexdigest()


def test_few_shot_fraction_is_the_originals_uniform_k():
    # 3 classes of 40 / 30 / 20: n_shot=0.1 -> k = int(0.1 * 90 / 3) = 3 of every class (BaseJsonDataset).
    labels = np.repeat([0, 1, 2], [40, 30, 20])
    src = ArraySource(np.random.default_rng(0).permutation(labels), 3)
    sub = D.few_shot_subset(src, 0.1)
    np.testing.assert_array_equal(np.bincount(sub.labels(), minlength=3), [3, 3, 3])
    info = sub.describe()["subset"]
    assert info["n_shot"] == 0.1 and isinstance(info["n_shot"], float) and info["k_per_class"] == 3
    members = _by_class(src.labels())
    assert sub.indices.tolist() == sorted(i for c in range(3) for i in _hash_order(members[c], 0)[:3])
    # Digits: k = int(0.25 * N / 10).
    digits = S.Digits("train")
    k = int(len(digits) * 0.25 / 10)
    np.testing.assert_array_equal(
        np.bincount(D.few_shot_subset(digits, 0.25).labels(), minlength=10), [k] * 10
    )


def test_few_shot_errors():
    src = ArraySource([0] * 10 + [1] * 4 + [2] * 2, 4, ["cat", "dog", "eel", "fox"])
    with pytest.raises(
        ValueError,
        match=r"needs 5 examples of every class.*3 classes.*1 \('dog'\): 4.*"
        r"2 \('eel'\): 2.*3 \('fox'\): 0",
    ):
        D.few_shot_subset(src, 5)
    with pytest.raises(ValueError, match="= 0 examples per class"):
        D.few_shot_subset(src, 0.1)  # int(0.1 * 16 / 4) = 0
    for bad in (0, -2):
        with pytest.raises(ValueError, match=">= 1"):
            D.few_shot_subset(src, bad)
    for bad in (1.0, 1.5, 0.0):
        with pytest.raises(ValueError, match=r"fraction in \(0, 1\)"):
            D.few_shot_subset(src, bad)
    for bad in (True, "5", None):
        with pytest.raises(TypeError, match="n_shot must be"):
            D.few_shot_subset(src, bad)
    multi = ArraySource([0, 1], 2)
    multi.multilabel = True
    with pytest.raises(ValueError, match="chexpert_fraction_subset"):
        D.few_shot_subset(multi, 1)


# --------------------------------------------------------------------------------------------------
# Folder / list datasets on tiny generated trees
# --------------------------------------------------------------------------------------------------


def _write_image(path: Path, seed: int, mode: str = "RGB", size=(7, 5)) -> np.ndarray:
    """A small lossless PNG (also under a .jpg name: PIL detects the format from the content)."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode=mode).save(path, format="PNG")
    return pixels


def _aircraft_tree(base: Path):
    """fgvc-aircraft-2013b with official lists: 3,334 train / 3 val / 2 test ids, images for a few."""
    root = base / "fgvc-aircraft-2013b"
    variants = [f"Model {i}-{i % 7}/B" for i in range(100)]  # spaces and slashes, as the real names
    data = root / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    parts = {"train": 3334, "val": 3, "test": 2}
    lists, start = {}, 1000000
    for part, count in parts.items():
        ids = [str(start + i) for i in range(count)]
        start += count
        labels = [(7 * int(i)) % 100 for i in ids]
        lists[part] = (ids, labels)
        text = "".join(f"{i} {variants[label]}\n" for i, label in zip(ids, labels, strict=True))
        (data / f"images_variant_{part}.txt").write_text(text)
    pixels = {}
    for part, (ids, _) in lists.items():
        for i in ids[:3]:
            pixels[f"{i}.jpg"] = _write_image(data / "images" / f"{i}.jpg", int(i))
    return root, variants, lists, pixels


def test_fgvc_aircraft_official_and_bob_lists(tmp_path):
    root, variants, lists, pixels = _aircraft_tree(tmp_path)
    official = {
        split: D.get_dataset("fgvc_aircraft", split, data_dir=tmp_path) for split in ("train", "val", "test")
    }
    for split, part in (("train", "train"), ("val", "val"), ("test", "test")):
        src, (ids, labels) = official[split], lists[part]
        assert src.source.files == tuple(f"{i}.jpg" for i in ids)
        np.testing.assert_array_equal(src.labels(), labels)
        assert src.class_names == tuple(variants) and src.num_classes == 100
        ex = src[1]
        np.testing.assert_array_equal(ex["image"], pixels[ex["name"]])
        assert int(ex["label"]) == labels[1]
        desc = src.describe()
        assert desc["origin"]["lists"] == "official" and desc["dataset"]["eval_split"] == "val"
    # BoB's list format, written from the official lists: first 3,334 lines = official train.
    out = D.write_bob_aircraft_lists(root)
    lines = (out / "train.txt").read_text().splitlines()
    assert len(lines) == 3337 and lines[0] == f"{lists['train'][0][0]}.jpg {lists['train'][1][0] + 1}"
    assert (out / "test.txt").read_text().splitlines()[
        1
    ] == f"{lists['test'][0][1]}.jpg {lists['test'][1][1] + 1}"
    for split in ("train", "val", "test"):
        bob = D.get_dataset("fgvc_aircraft", split, data_dir=root)  # the root itself works too
        assert bob.source.files == official[split].source.files
        np.testing.assert_array_equal(bob.labels(), official[split].labels())
        assert bob.describe()["origin"]["lists"] == "bob aircraft_list"
    assert D.get_dataset("fgvc_aircraft", "train", data_dir=root).describe()["origin"]["lines"] == "1-3334"
    assert D.get_dataset("fgvc_aircraft", "val", data_dir=root).describe()["origin"]["lines"] == "3335-"
    D.write_bob_aircraft_lists(root)  # same content: fine
    (out / "test.txt").write_text("edited\n")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        D.write_bob_aircraft_lists(root)
    (out / "train.txt").write_text("\n".join(lines[:3334]) + "\n")  # train only, no val part
    with pytest.raises(ValueError, match="3334 lines; BoB takes the first 3334"):
        D.get_dataset("fgvc_aircraft", "val", data_dir=root)


_CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]


def _chexpert_tree(base: Path, name: str, n_rows: int, seed: int):
    from bob_jax.evaluate.multilabel import CHEXPERT_CSV_OBSERVATIONS

    root = base / "CheXpert-v1.0-small"
    rng = np.random.default_rng(seed)
    values = np.array(["1.0", "0.0", "-1.0", ""])
    rows = []
    split_dir = name.removesuffix(".csv")
    for i in range(n_rows):
        view = "lateral" if i % 4 == 3 else "frontal"
        rel = f"{split_dir}/patient{i:05d}/study1/view1_{view}.jpg"
        obs = list(rng.choice(values, len(CHEXPERT_CSV_OBSERVATIONS)))
        rows.append([f"CheXpert-v1.0-small/{rel}", "Female", "60", view.capitalize(), "AP", *obs])
        if view == "frontal":
            _write_image(root / rel, seed * 1000 + i, mode="L")
    lines = [",".join(_CHEXPERT_HEADER + list(CHEXPERT_CSV_OBSERVATIONS))] + [",".join(r) for r in rows]
    (root / name).write_text("\n".join(lines) + "\n")
    return root


def _bob_chexpert_targets(csv_path: Path):
    """BoB's LibAUC-derived CheXpert target code, replayed with pandas (frontal, U-Ones/U-Zeros, fillna)."""
    import pandas as pd

    df = pd.read_csv(csv_path)
    df["Path"] = df["Path"].str.replace("CheXpert-v1.0-small/", "")
    df = df[df["Frontal/Lateral"] == "Frontal"]
    cols = ["Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion"]
    for col in cols:
        df[col] = df[col].replace(-1, 1 if col in ("Edema", "Atelectasis") else 0).fillna(0)
    return df["Path"].tolist(), df[cols].to_numpy(np.float32)


def test_chexpert_targets_and_bob_fraction(tmp_path):
    from bob_jax.evaluate.multilabel import CHEXPERT_LABELS

    root = _chexpert_tree(tmp_path, "train.csv", 40, seed=1)
    _chexpert_tree(tmp_path, "valid.csv", 12, seed=2)
    paths, targets = _bob_chexpert_targets(root / "train.csv")
    src = D.get_dataset("chexpert", "train", data_dir=tmp_path)
    assert len(src) == 30 and src.multilabel and src.num_classes == 5 and src.class_names == CHEXPERT_LABELS
    assert src.source.files == tuple(paths)
    np.testing.assert_array_equal(src.labels(), targets)
    assert src.labels().dtype == np.float32 and src.labels().shape == (30, 5)
    assert {0.0, 1.0} == set(np.unique(targets).tolist())
    ex = src[4]
    assert ex["label"].dtype == np.float32 and ex["label"].shape == (5,)
    np.testing.assert_array_equal(ex["label"], targets[4])
    assert ex["image"].shape == (5, 7, 3) and ex["image"].dtype == np.uint8
    with Image.open(root / paths[4]) as im:
        grey = np.asarray(im)
    for channel in range(3):
        np.testing.assert_array_equal(ex["image"][..., channel], grey)
    desc = src.describe()
    assert desc["origin"]["frontal_only"] and desc["origin"]["csv_rows"] == 40
    assert desc["dataset"]["multilabel"] and desc["dataset"]["physical_split"] == "train.csv"
    val = D.get_dataset("chexpert", "val", data_dir=root)
    np.testing.assert_array_equal(val.labels(), _bob_chexpert_targets(root / "valid.csv")[1])
    # n_shot=0.5: BoB shuffles the frontal rows with numpy's legacy global seed 123 and keeps the first half.
    state = np.random.get_state()
    try:
        data_index = list(range(30))
        np.random.seed(123)
        np.random.shuffle(data_index)
    finally:
        np.random.set_state(state)
    half = D.get_dataset("chexpert", "train", data_dir=tmp_path, n_shot=0.5)
    assert half.indices.tolist() == sorted(data_index[:15])
    np.testing.assert_array_equal(half.labels(), targets[sorted(data_index[:15])])
    info = half.describe()["subset"]
    assert info["rule"] == "chexpert_prefix" and info["seed"] == 123 and info["n_shot"] == 0.5
    with pytest.raises(ValueError, match="fraction of rows"):
        D.get_dataset("chexpert", "train", data_dir=tmp_path, n_shot=5)
    with pytest.raises(ValueError, match="multi-label"):
        D.few_shot_subset(src, 2)


def test_visda_synthetic_to_real(tmp_path):
    root = tmp_path / "visda2017"
    for split, count in (("train", 2), ("validation", 1)):
        for ci, cname in enumerate(D.VISDA_CLASSES):
            for k in range(count):
                _write_image(root / split / cname / f"{cname}_{k}.png", 100 * ci + k)
    train = D.get_dataset("visda2017", "train", data_dir=tmp_path)
    test = D.get_dataset("visda2017", "test", data_dir=tmp_path)
    assert len(train) == 24 and len(test) == 12 and train.class_names == D.VISDA_CLASSES
    np.testing.assert_array_equal(test.labels(), np.arange(12))
    assert test.describe()["dataset"]["physical_split"] == "validation"
    assert test.describe()["origin"]["root"] == str(root / "validation")
    (root / "validation" / "plant").rename(root / "validation" / "potted_plant")
    with pytest.raises(ValueError, match="potted_plant.*differ from the expected"):
        D.get_dataset("visda2017", "test", data_dir=tmp_path)


def test_cub_lists_and_folder_tree(tmp_path):
    root = tmp_path / "CUB_200_2011"
    classes = [f"{c + 1:03d}.Bird_{c}" for c in range(200)]
    rows = []
    for c, cname in enumerate(classes):
        for k in range(2 if c < 3 else 1):
            rel = f"{cname}/Bird_{c}_{k}.jpg"
            _write_image(root / "images" / rel, 10 * c + k, size=(3, 2))
            rows.append((rel, c))
    ids = range(1, len(rows) + 1)
    (root / "images.txt").write_text("".join(f"{i} {rel}\n" for i, (rel, _) in zip(ids, rows, strict=True)))
    (root / "image_class_labels.txt").write_text(
        "".join(f"{i} {c + 1}\n" for i, (_, c) in zip(ids, rows, strict=True))
    )
    (root / "train_test_split.txt").write_text("".join(f"{i} {i % 2}\n" for i in ids))
    (root / "classes.txt").write_text("".join(f"{c + 1} {name}\n" for c, name in enumerate(classes)))
    everything = D.get_dataset("cub200_2011", "all", data_dir=tmp_path)
    train = D.get_dataset("cub200_2011", "train", data_dir=tmp_path)
    test = D.get_dataset("cub200_2011", "test", data_dir=root)
    assert len(everything) == len(rows) == 203 and len(train) + len(test) == 203
    assert train.class_names == everything.class_names == tuple(classes)
    folder_label = dict(zip(everything.source.files, everything.labels().tolist(), strict=True))
    for part, want in ((train, 1), (test, 0)):
        expected = [(rel, c) for i, (rel, c) in zip(ids, rows, strict=True) if i % 2 == want]
        assert list(zip(part.source.files, part.labels().tolist(), strict=True)) == expected
        assert all(folder_label[rel] == c for rel, c in expected)  # lists agree with the folder tree
    assert everything.describe()["dataset"]["protocol"] == {"query_fraction": 0.2, "max_per_class": None}


def test_retrieval_class_folders(tmp_path):
    from bob_jax.evaluate.retrieval import class_folder_split

    instre = tmp_path / "INSTRE-S1"
    for c in range(100):
        for k in range(6 if c == 0 else 1):
            _write_image(instre / f"{c:03d}_object" / f"{k:02d}.jpg", 7 * c + k, size=(2, 2))
    src = D.get_dataset("instre_s1", "all", data_dir=tmp_path)
    assert len(src) == 105 and src.num_classes == 100
    query, db = class_folder_split(src.source.files, src.labels(), **src.describe()["dataset"]["protocol"])
    assert query.tolist() == [0] and len(db) == 104  # class 0: int(6 * 0.2) = 1 query, 5 database
    objectnet = tmp_path / "objectnet-1.0" / "images"
    for c in range(313):
        _write_image(objectnet / f"class_{c:03d}" / "a.png", c, size=(2, 2))
    assert len(D.get_dataset("objectnet", "all", data_dir=tmp_path)) == 313
    # A folder with the wrong number of classes is refused (here: the INSTRE root with S1/S2/M).
    wrong = tmp_path / "INSTRE"
    for part in ("INSTRE-S2", "INSTRE-M", "other"):
        _write_image(wrong / part / "x" / "a.png", 1, size=(2, 2))
    with pytest.raises(ValueError, match="3 classes, expected 100"):
        D.get_dataset("instre_s1", "all", data_dir=wrong)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", FOLDER_SPECS, ids=lambda s: s.name)
def test_folder_datasets_missing_data_errors(tmp_path, spec):
    with pytest.raises(FileNotFoundError) as err:
        D.get_dataset(spec.name, spec.eval_split, data_dir=tmp_path / "nowhere")
    msg = str(err.value)
    assert spec.name in msg and "How to get it" in msg and "Expected layout" in msg
    assert spec.prepare_text(tmp_path / "nowhere") in msg
    if spec.name != "instre_s1":  # INSTRE has no stable public URL; the message names the paper
        assert "http" in msg
    with pytest.raises(FileNotFoundError, match="pass data_dir="):
        D.get_dataset(spec.name, spec.eval_split)


def test_tfds_datasets_unprepared_errors(tmp_path):
    for spec in TFDS_SPECS:
        with pytest.raises(FileNotFoundError) as err:
            D.get_dataset(spec.name, spec.eval_split, data_dir=tmp_path)
        msg = str(err.value)
        assert f"tfds build {spec.tfds_name} --data_dir={tmp_path} --file_format=array_record" in msg, msg
        assert "pip install tensorflow" in msg and str(tmp_path) in msg
    with pytest.raises(FileNotFoundError) as err:
        S.get_source("imagenet2012", "train", data_dir=tmp_path)
    msg = str(err.value)
    assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in msg and "<manual_dir>" in msg
    assert "https://image-net.org/download-images" in msg
    assert re.search(r"tfds build imagenet2012 .*--file_format=array_record --manual_dir=<manual_dir>", msg)
    subset_msg = str(
        pytest.raises(
            FileNotFoundError, D.get_dataset, "imagenet2012_subset/1pct", "train", data_dir=tmp_path
        ).value
    )
    assert "ILSVRC2012_img_val.tar" in subset_msg and "1percent.txt" in subset_msg


def test_split_and_name_errors():
    with pytest.raises(ValueError, match=r"'cifar100' has splits \('train', 'test'\) \(BoB reports 'test'\)"):
        D.get_dataset("cifar100", "val")
    with pytest.raises(ValueError, match=r"'imagenet_a' has splits \('test',\)"):
        S.get_source("bench:imagenet_a", "train")
    with pytest.raises(ValueError, match="unknown benchmark dataset 'nope'"):
        D.get_dataset("nope", "train")


def test_get_source_keeps_existing_names(tmp_path, mock_tfds):
    assert isinstance(S.get_source("digits", "test"), S.Digits)
    with pytest.raises(FileNotFoundError, match="fashion-mnist"):
        S.get_source("fashion_mnist", "test", data_dir=tmp_path)
    _write_image(tmp_path / "tree" / "a" / "x.png", 0)
    assert isinstance(S.get_source(f"folder:{tmp_path / 'tree'}", "train"), S.ImageFolder)
    with pytest.raises(
        ValueError, match=r"unknown data source 'imagenet'.*bench:<name>.*cifar100.*visda2017"
    ):
        S.get_source("imagenet", "train")
    with pytest.raises(ValueError, match=r"unknown data source 'bench:nope'"):
        S.get_source("bench:nope", "train")
    with mock_tfds(10):
        flowers = S.get_source("flowers102", "val")  # BoB's spelling, through the alias table
        assert flowers.describe()["dataset"]["physical_split"] == "validation"
        assert isinstance(S.get_source("tfds:cifar100", "test"), S.TfdsSource)  # tfds: keeps its meaning


def test_embedded_shapes_multilabel_source():
    from bob_jax.data.sources import get_source
    from bob_jax.detection.synthetic import render_scene

    train = get_source("shapes", "train", train_size=6, test_size=4, size=32, seed=3)
    test = get_source("shapes", "test", train_size=6, test_size=4, size=32, seed=3)
    assert (len(train), len(test), train.num_classes, train.multilabel) == (6, 4, 5, True)
    labels = test.labels()
    assert labels.shape == (4, 5) and labels.dtype == np.float32
    for i in range(4):  # test image i is scene 6 + i: disjoint from train, targets = classes present
        image, instances = render_scene(3, 6 + i, 32)
        np.testing.assert_array_equal(test[i]["image"], image)
        np.testing.assert_array_equal(labels[i], np.isin(np.arange(5), [c for c, _ in instances]))
    assert train.describe()["origin"]["first_index"] == 0 and test.describe()["origin"]["first_index"] == 6
    with pytest.raises(ValueError, match="split"):
        get_source("shapes", "val")
