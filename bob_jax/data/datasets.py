"""The benchmark's named datasets: a declarative registry with pinned split rules and preparation steps.

`DATASETS[name]` is a `DatasetSpec`: where the data comes from (a tensorflow-datasets ArrayRecord build or
a folder / list layout), which *physical* split each logical split ("train", "val", "test", "all") reads,
which logical split BoB reports (`eval_split`), derived split rules, and how to obtain the data.
`get_dataset(name, split)` returns a source with the `sources.py` protocol whose `describe()` carries
the spec's record (`describe()["dataset"]`), so every result names the exact split and rule it used.

    from bob_jax.data.datasets import get_dataset, list_datasets
    train = get_dataset("oxford_flowers102", "train", data_dir="~/tfds")
    val = get_dataset("oxford_flowers102", "val", data_dir="~/tfds")     # BoB reports validation
    shots = get_dataset("eurosat", "train", data_dir="~/tfds", n_shot=5)  # 5 per class, seed 0
    get_source("cifar100", "test") / get_source("bench:cifar100", "test") # the same, through sources.py

Split rules (bob-spec 3.1, 3.3, 3.5, 3.6, 5.2, 7.5):
- Flowers-102 and FGVC-Aircraft are evaluated on their *validation* split, as in BoB; "test" is offered as
  an extra column. CIFAR-100 is evaluated on its test set; ImageNet (and the 1 % / 10 % SimCLR subsets)
  on the validation set.
- EuroSAT: BoB's JSON split is private. tensorflow-datasets has only `train` (27,000 images); "val" is a
  seeded stratified 20 % hold-out (per class in SplitMix64 hash order, largest-remainder allocation, the
  `seeded_subset` machinery of sources.py), "train" the remaining 80 %; the rule and index hash are recorded.
- `n_shot` (the original's `--n_shot`): an int k takes k examples of every class; a float f in (0, 1)
  takes k = int(f * N / C) of every class, the original's rule (`BaseJsonDataset`: one k for all classes,
  so a per-class fraction on balanced data). Chosen per class in SplitMix64 order of `seed` (default 0)
  instead of Python's `random.sample` (whose algorithm is not pinned across Python versions).
  CheXpert (multi-label) keeps its own rule: the first int(f * N) frontal rows after numpy's legacy
  `RandomState(123).shuffle`, exactly BoB's LibAUC-derived loader.
- ImageNet-A / -R: labels stay in the 1000-class space; `spec.logit_mask` (the original 200-class lists,
  `imagenet_ood_classes`) restricts the logits and `to_masked_labels` converts labels for
  `bob_jax.evaluate.ood.masked_top1`.
- Retrieval sets (CUB-200-2011, INSTRE-S1, ObjectNet) expose their class-folder tree as split "all";
  `spec.protocol` records BoB's query fraction and per-class cap for `evaluate.retrieval.class_folder_split`.

Missing data raises FileNotFoundError with the exact steps to obtain and prepare it (`spec.prepare`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bob_jax.data.imagenet_ood_classes import OOD_CLASS_LISTS, valid_class_indices
from bob_jax.data.sources import (
    ImageFolder,
    Subset,
    TfdsSource,
    _init_pil,
    _seeded_order,
    _stratified_pick,
    read_many,
    read_rgb,
)

__all__ = [
    "AIRCRAFT_BOB_TRAIN_LINES",
    "ALIASES",
    "DATASETS",
    "VISDA_CLASSES",
    "BenchmarkSource",
    "DatasetSpec",
    "FileListSource",
    "chexpert_fraction_subset",
    "few_shot_subset",
    "get_dataset",
    "get_spec",
    "list_datasets",
    "resolve_name",
    "stratified_holdout",
    "write_bob_aircraft_lists",
]


# --------------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One benchmark dataset: data source, split mapping, BoB's evaluation split, preparation steps.

    splits: logical split -> physical split (a tfds split name, a list/CSV file or a folder).
    eval_split: the logical split BoB reports. holdout: a derived split rule (EuroSAT), else None.
    folder_names: sub-directories of `data_dir` searched for the dataset root (folder backends).
    protocol: task parameters BoB used with this dataset (retrieval query fraction, per-class cap).
    few_shot: how `n_shot` subsets it ("per_class", "chexpert_prefix").
    """

    name: str
    title: str
    task: str
    backend: str
    num_classes: int
    splits: dict[str, str]
    eval_split: str
    bob: str
    prepare: str
    tfds_name: str | None = None
    holdout: dict[str, Any] | None = None
    logit_mask_list: str | None = None
    multilabel: bool = False
    folder_names: tuple[str, ...] = ()
    protocol: dict[str, Any] | None = None
    few_shot: str = "per_class"

    @property
    def logit_mask(self) -> np.ndarray | None:
        """Ascending ImageNet-1k indices whose logits the evaluation keeps (ImageNet-A/R), else None."""
        return None if self.logit_mask_list is None else valid_class_indices(self.logit_mask_list)

    def check_split(self, split: str) -> str:
        if split not in self.splits:
            raise ValueError(
                f"benchmark dataset {self.name!r} has splits {tuple(self.splits)} (BoB reports "
                f"{self.eval_split!r}), got split={split!r}"
            )
        return split

    def prepare_text(self, data_dir: str | os.PathLike | None = None) -> str:
        """`prepare` with `<data_dir>` filled in when the caller gave one."""
        return self.prepare if data_dir is None else self.prepare.replace("<data_dir>", os.fspath(data_dir))

    def record(self, split: str) -> dict[str, Any]:
        """JSON-friendly record of this dataset and split (goes into results via `describe()`)."""
        mask = None
        if self.logit_mask_list is not None:
            mask = {
                "list": self.logit_mask_list,
                "size": len(self.logit_mask),
                "sha256": OOD_CLASS_LISTS[self.logit_mask_list][1],
            }
        return {
            "registry": self.name,
            "title": self.title,
            "task": self.task,
            "logical_split": split,
            "physical_split": self.splits[split],
            "eval_split": self.eval_split,
            "tfds_name": self.tfds_name,
            "holdout": dict(self.holdout) if self.holdout and split in self.holdout["parts"] else None,
            "logit_mask": mask,
            "multilabel": self.multilabel,
            "protocol": dict(self.protocol) if self.protocol else None,
            "bob": self.bob,
        }


# --------------------------------------------------------------------------------------------------
# Preparation instructions (shown in errors)
# --------------------------------------------------------------------------------------------------

_IMAGENET_MANUAL = (
    "ImageNet cannot be downloaded automatically: register at https://image-net.org/download-images, "
    "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, and put both files in <manual_dir>."
)


def _tfds_prepare(tfds_name: str, *, manual: str = "", note: str = "") -> str:
    build = f"tfds build {tfds_name} --data_dir=<data_dir> --file_format=array_record"
    if manual:
        build += " --manual_dir=<manual_dir>"
    steps = [manual] if manual else []
    steps += [
        (
            "Prepare it once as ArrayRecord, in an environment with network access and TensorFlow (the "
            "tfds build command and image encoders need TensorFlow; reading the ArrayRecord files here "
            "does not): `pip install tensorflow tensorflow-datasets importlib_resources`, then"
        ),
        f"    {build}",
        (
            "then pass data_dir=<data_dir> (or set TFDS_DATA_DIR). TFRecord builds cannot be read without "
            "TensorFlow: rebuild them with --file_format=array_record."
        ),
    ]
    if note:
        steps.append(note)
    return "\n".join(steps)


def _folder_prepare(where: str, layout: str, note: str = "") -> str:
    text = f"{where}\nExpected layout (data_dir = the top folder shown, or its parent):\n{layout}"
    return f"{text}\n{note}" if note else text


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

AIRCRAFT_BOB_TRAIN_LINES = 3334  # BoB: first 3,334 lines of aircraft_list/train.txt train, the rest val
CHEXPERT_BOB_SHUFFLE_SEED = 123  # LibAUC CheXpert(shuffle=True, seed=123), as BoB calls it
VISDA_CLASSES = (
    "aeroplane",
    "bicycle",
    "bus",
    "car",
    "horse",
    "knife",
    "motorcycle",
    "person",
    "plant",
    "skateboard",
    "train",
    "truck",
)
_OOD_NOTE = "Test-only out-of-distribution set, evaluated with the ImageNet fine-tuned classifier."

_SPECS = (
    DatasetSpec(
        name="imagenet2012",
        title="ImageNet-1k (ILSVRC 2012)",
        task="classification",
        backend="tfds",
        tfds_name="imagenet2012",
        num_classes=1000,
        splits={"train": "train", "val": "validation"},
        eval_split="val",
        bob="fine-tuning / linear probing; reported on the 50,000 validation images (bob-spec 3.1, 3.2)",
        prepare=_tfds_prepare("imagenet2012", manual=_IMAGENET_MANUAL),
    ),
    DatasetSpec(
        name="imagenet2012_subset/1pct",
        title="Semi-supervised ImageNet, 1 % labels (SimCLR list)",
        task="semi_supervised",
        backend="tfds",
        tfds_name="imagenet2012_subset/1pct",
        num_classes=1000,
        splits={"train": "train", "val": "validation"},
        eval_split="val",
        bob="train_semi.py with google-research/simclr imagenet_subsets/1percent.txt; full validation set",
        prepare=_tfds_prepare(
            "imagenet2012_subset/1pct",
            manual=_IMAGENET_MANUAL,
            note="The build also downloads SimCLR's imagenet_subsets/1percent.txt (network).",
        ),
    ),
    DatasetSpec(
        name="imagenet2012_subset/10pct",
        title="Semi-supervised ImageNet, 10 % labels (SimCLR list)",
        task="semi_supervised",
        backend="tfds",
        tfds_name="imagenet2012_subset/10pct",
        num_classes=1000,
        splits={"train": "train", "val": "validation"},
        eval_split="val",
        bob="train_semi.py with google-research/simclr imagenet_subsets/10percent.txt; full validation set",
        prepare=_tfds_prepare(
            "imagenet2012_subset/10pct",
            manual=_IMAGENET_MANUAL,
            note="The build also downloads SimCLR's imagenet_subsets/10percent.txt (network).",
        ),
    ),
    DatasetSpec(
        name="cifar100",
        title="CIFAR-100",
        task="classification",
        backend="tfds",
        tfds_name="cifar100",
        num_classes=100,
        splits={"train": "train", "test": "test"},
        eval_split="test",
        bob="BoB's 'validation' for CIFAR is the 10,000-image test set (bob-spec 3.1)",
        prepare=_tfds_prepare("cifar100"),
    ),
    DatasetSpec(
        name="oxford_flowers102",
        title="Oxford Flowers-102",
        task="classification",
        backend="tfds",
        tfds_name="oxford_flowers102",
        num_classes=102,
        splits={"train": "train", "val": "validation", "test": "test"},
        eval_split="val",
        bob="train = setid.mat trnid, evaluated on the official validation ids (valid), not tstid (5.2)",
        prepare=_tfds_prepare("oxford_flowers102"),
    ),
    DatasetSpec(
        name="eurosat",
        title="EuroSAT (RGB)",
        task="classification",
        backend="tfds",
        tfds_name="eurosat/rgb",
        num_classes=10,
        splits={"train": "train", "val": "train"},
        eval_split="val",
        holdout={
            "rule": "stratified_holdout",
            "parts": {"val": "holdout", "train": "rest"},
            "source_split": "train",
            "fraction": 0.2,
            "seed": 0,
            "order": "splitmix64 per class, largest-remainder allocation (sources.seeded_subset)",
        },
        bob="BoB's JSON train/val split is private (5.3); this seeded stratified 80/20 split replaces it",
        prepare=_tfds_prepare("eurosat/rgb"),
    ),
    DatasetSpec(
        name="imagenet_v2",
        title="ImageNet-V2 (matched frequency)",
        task="ood",
        backend="tfds",
        tfds_name="imagenet_v2/matched-frequency",
        num_classes=1000,
        splits={"test": "test"},
        eval_split="test",
        bob=f"{_OOD_NOTE} (bob-spec 3.5)",
        prepare=_tfds_prepare("imagenet_v2/matched-frequency"),
    ),
    DatasetSpec(
        name="imagenet_a",
        title="ImageNet-A",
        task="ood",
        backend="tfds",
        tfds_name="imagenet_a",
        num_classes=1000,
        splits={"test": "test"},
        eval_split="test",
        logit_mask_list="imagenet_a",
        bob=f"{_OOD_NOTE} Logits restricted to the 200 classes of valid_labels_imagenet_a.txt (3.5)",
        prepare=_tfds_prepare("imagenet_a"),
    ),
    DatasetSpec(
        name="imagenet_r",
        title="ImageNet-R (renditions)",
        task="ood",
        backend="tfds",
        tfds_name="imagenet_r",
        num_classes=1000,
        splits={"test": "test"},
        eval_split="test",
        logit_mask_list="imagenet_r",
        bob=f"{_OOD_NOTE} Logits restricted to the 200 classes of valid_labels_imagenet_r.txt (3.5)",
        prepare=_tfds_prepare("imagenet_r"),
    ),
    DatasetSpec(
        name="imagenet_sketch",
        title="ImageNet-Sketch",
        task="ood",
        backend="tfds",
        tfds_name="imagenet_sketch",
        num_classes=1000,
        splits={"test": "test"},
        eval_split="test",
        bob=f"{_OOD_NOTE} (bob-spec 3.5)",
        prepare=_tfds_prepare("imagenet_sketch"),
    ),
    DatasetSpec(
        name="fgvc_aircraft",
        title="FGVC-Aircraft 2013b (100 variants)",
        task="classification",
        backend="aircraft",
        num_classes=100,
        splits={
            "train": "images_variant_train.txt (or aircraft_list/train.txt lines 1-3,334)",
            "val": "images_variant_val.txt (or aircraft_list/train.txt lines 3,335-)",
            "test": "images_variant_test.txt (or aircraft_list/test.txt)",
        },
        eval_split="val",
        folder_names=("fgvc-aircraft-2013b",),
        bob="first 3,334 lines of data/aircraft_list/train.txt train, the rest val; lists not shipped (3.1)",
        prepare=_folder_prepare(
            "Download https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz "
            "and extract it.",
            "    fgvc-aircraft-2013b/data/images/<image id>.jpg\n"
            "    fgvc-aircraft-2013b/data/variants.txt\n"
            "    fgvc-aircraft-2013b/data/images_variant_{train,val,test}.txt   ('<image id> <variant>')",
            "BoB's own lists (data/aircraft_list/{train,test}.txt, '<file> <1-based label>') were not "
            "published; bob_jax.data.datasets.write_bob_aircraft_lists(<root>) writes them from the official "
            "lists (train then val, so lines 1-3,334 are the official train split). Without them the official "
            "lists are read directly.",
        ),
    ),
    DatasetSpec(
        name="chexpert",
        title="CheXpert-v1.0-small (5 competition labels)",
        task="multilabel",
        backend="chexpert",
        num_classes=5,
        splits={"train": "train.csv", "val": "valid.csv"},
        eval_split="val",
        multilabel=True,
        few_shot="chexpert_prefix",
        folder_names=("CheXpert-v1.0-small", "CheXpert-v1.0"),
        bob="frontal views only, uncertain -> 1 for Edema/Atelectasis, 0 otherwise; mean AUROC on valid.csv; "
        "README run --n_shot 0.1 (3.3)",
        prepare=_folder_prepare(
            "Request access and download CheXpert-v1.0-small.zip from https://stanfordmlgroup.github.io/"
            "competitions/chexpert/ (Stanford AIMI), and extract it.",
            "    CheXpert-v1.0-small/train.csv, CheXpert-v1.0-small/valid.csv\n"
            "    CheXpert-v1.0-small/{train,valid}/patient*/study*/view*_{frontal,lateral}.jpg",
            "CSV 'Path' entries start with 'CheXpert-v1.0-small/' (or 'CheXpert-v1.0/'); that prefix is "
            "dropped and the rest is read relative to the folder holding the CSV.",
        ),
    ),
    DatasetSpec(
        name="visda2017",
        title="VisDA-2017 classification (synthetic -> real)",
        task="domain_shift",
        backend="visda",
        num_classes=12,
        splits={"train": "train", "test": "validation"},
        eval_split="test",
        folder_names=("visda2017", "visda", "VisDA-2017"),
        bob="fine-tune on Synthetic (train/), test on Real (validation/), tllib VisDA2017 (3.5)",
        prepare=_folder_prepare(
            "Download http://csr.bu.edu/ftp/visda17/clf/train.tar (synthetic) and "
            "http://csr.bu.edu/ftp/visda17/clf/validation.tar (real) (VisionLearningGroup/taskcv-2017-public) "
            "and extract both into one folder.",
            "    <root>/train/<class>/*.png        (12 classes: " + ", ".join(VISDA_CLASSES) + ")\n"
            "    <root>/validation/<class>/*.jpg",
        ),
    ),
    DatasetSpec(
        name="cub200_2011",
        title="CUB-200-2011",
        task="retrieval",
        backend="cub",
        num_classes=200,
        splits={
            "all": "images/ (class folders, all 11,788 images)",
            "train": "train_test_split.txt is_training_image=1",
            "test": "train_test_split.txt is_training_image=0",
        },
        eval_split="all",
        folder_names=("CUB_200_2011",),
        protocol={"query_fraction": 0.2, "max_per_class": None},
        bob="retrieval over all 200 classes, first 20 % of sorted file names per class are queries (3.6, 5.2)",
        prepare=_folder_prepare(
            "Download CUB_200_2011.tgz from https://data.caltech.edu/records/65de6-vp158 and extract it.",
            "    CUB_200_2011/images/<class>/<image>.jpg\n"
            "    CUB_200_2011/{images,image_class_labels,classes,train_test_split}.txt   (train/test only)",
        ),
    ),
    DatasetSpec(
        name="instre_s1",
        title="INSTRE-S1 (single-object instances)",
        task="retrieval",
        backend="class_folders",
        num_classes=100,
        splits={"all": "INSTRE-S1/<class>/"},
        eval_split="all",
        folder_names=("INSTRE-S1", "S1", "INSTRE/INSTRE-S1"),
        protocol={"query_fraction": 0.2, "max_per_class": 50},
        bob="retrieval, <= 50 images per class, first 20 % per class are queries (3.6)",
        prepare=_folder_prepare(
            "Obtain INSTRE from its authors (Wang & Jiang, 'INSTRE: a new benchmark for instance-level object "
            "retrieval and recognition', ACM TOMM 2015); BoB uses the single-object part INSTRE-S1.",
            "    INSTRE-S1/<class>/<image>.jpg   (100 class folders)",
        ),
    ),
    DatasetSpec(
        name="objectnet",
        title="ObjectNet 1.0",
        task="retrieval",
        backend="class_folders",
        num_classes=313,
        splits={"all": "objectnet-1.0/images/<class>/"},
        eval_split="all",
        folder_names=("objectnet-1.0/images", "images"),
        protocol={"query_fraction": 0.2, "max_per_class": 50},
        bob="retrieval, <= 50 images per class, first 20 % per class are queries; images used uncropped (3.6)",
        prepare=_folder_prepare(
            "Download objectnet-1.0.zip from https://objectnet.dev/download.html (licence agreement, "
            "password-protected archive) and extract it.",
            "    objectnet-1.0/images/<class>/<image>.png   (313 class folders)",
        ),
    ),
)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}

# Other spellings (BoB's dataset arguments, tfds names) -> registry name. Keys are normalised (_norm).
ALIASES = {
    "eurosat/rgb": "eurosat",
    "flower102": "oxford_flowers102",
    "flowers102": "oxford_flowers102",
    "aircraft": "fgvc_aircraft",
    "semiimagenet_1pct": "imagenet2012_subset/1pct",
    "semiimagenet_10pct": "imagenet2012_subset/10pct",
    "imagenet_v2/matched_frequency": "imagenet_v2",
    "visda": "visda2017",
    "cub200": "cub200_2011",
    "cub_200_2011": "cub200_2011",
    "instre": "instre_s1",
}


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def resolve_name(name: str) -> str | None:
    """The registry name for `name` or one of its aliases (case and '-'/'_' insensitive); None if unknown."""
    key = _norm(name)
    if key in DATASETS:
        return key
    return ALIASES.get(key)


def get_spec(name: str) -> DatasetSpec:
    resolved = resolve_name(name)
    if resolved is None:
        raise ValueError(f"unknown benchmark dataset {name!r}; known: {', '.join(list_datasets())}")
    return DATASETS[resolved]


def list_datasets() -> list[str]:
    """Registry names, sorted."""
    return sorted(DATASETS)


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


class BenchmarkSource:
    """A source of a registered dataset: delegates reads, adds the spec's record to `describe()`."""

    def __init__(self, source, spec: DatasetSpec, split: str):
        self.source, self.spec, self.split = source, spec, split
        self.num_classes = int(source.num_classes)
        self.class_names = tuple(source.class_names)
        self.multilabel = spec.multilabel

    @property
    def logit_mask(self) -> np.ndarray | None:
        return self.spec.logit_mask

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[index]

    def _getitems(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return read_many(self.source, indices)

    __getitems__ = _getitems

    def labels(self) -> np.ndarray:
        return self.source.labels()

    def describe(self) -> dict[str, Any]:
        desc = dict(self.source.describe())
        desc["backend"] = desc.get("name")
        desc["name"] = self.spec.name
        desc["split"] = self.split
        desc["dataset"] = self.spec.record(self.split)
        return desc

    def __repr__(self) -> str:
        return f"BenchmarkSource({self.spec.name!r}, split={self.split!r}, n={len(self)})"


class FileListSource:
    """Images named by a list: `root / files[i]` with `labels[i]` (int class, or float32 targets if multilabel).

    Decoding is ImageFolder's (PIL, `.convert("RGB")`); items carry "name" (the listed path). Only the
    first listed file is checked at construction, so a wrong root fails early without stat-ing every file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        files: Sequence[str],
        labels,
        class_names: Sequence[str],
        *,
        name: str,
        split: str,
        origin: dict[str, Any] | None = None,
        multilabel: bool = False,
    ):
        self.root, self.name, self.split = Path(root), name, split
        self.files = tuple(files)
        self.multilabel = multilabel
        self._labels = np.asarray(labels, np.float32 if multilabel else np.int32)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        if len(self.files) != len(self._labels):
            raise ValueError(f"{name} {split}: {len(self.files)} files but {len(self._labels)} labels")
        if not self.files:
            raise ValueError(f"{name} {split}: the image list is empty")
        expected_ndim = 2 if multilabel else 1
        if self._labels.ndim != expected_ndim:
            raise ValueError(
                f"{name} {split}: labels must have {expected_ndim} dims, got {self._labels.shape}"
            )
        if not multilabel and (self._labels.min() < 0 or self._labels.max() >= self.num_classes):
            raise ValueError(
                f"{name} {split}: labels span [{self._labels.min()}, {self._labels.max()}], outside the "
                f"{self.num_classes} classes"
            )
        first = self.root / self.files[0]
        if not first.is_file():
            raise FileNotFoundError(
                f"{name} {split}: listed image {str(first)!r} does not exist (wrong image root, or the "
                "images were not extracted)"
            )
        self.origin = dict(origin or {})
        _init_pil()

    def __setstate__(self, state):
        self.__dict__.update(state)
        _init_pil()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        image = np.asarray(read_rgb(self.root / self.files[index]))
        label = self._labels[index].copy() if self.multilabel else self._labels[index]
        return {"image": image, "label": label, "name": self.files[index]}

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "split": self.split,
            "size": len(self),
            "num_classes": self.num_classes,
            "origin": {
                "root": str(self.root),
                "files_sha256": hashlib.sha256("\n".join(self.files).encode()).hexdigest(),
                "labels_sha256": hashlib.sha256(np.ascontiguousarray(self._labels).tobytes()).hexdigest(),
                **self.origin,
            },
            "subset": None,
        }

    def __repr__(self) -> str:
        return f"FileListSource({self.name!r}, split={self.split!r}, n={len(self)})"


# --------------------------------------------------------------------------------------------------
# Split rules and few-shot subsets
# --------------------------------------------------------------------------------------------------


def stratified_holdout(source, part: str, *, fraction: float, seed: int) -> Subset:
    """The hold-out ("holdout") or the remainder ("rest") of a seeded stratified split of `source`.

    round(fraction * N) examples are held out, allocated over classes by largest remainder and chosen per
    class in SplitMix64 order of `seed` (sources.seeded_subset's rule); both parts are sorted indices.
    """
    if part not in ("holdout", "rest"):
        raise ValueError(f"part must be 'holdout' or 'rest', got {part!r}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must lie in (0, 1), got {fraction}")
    labels = np.asarray(source.labels())
    held = _stratified_pick(labels, round(fraction * len(labels)), seed)
    idx = held if part == "holdout" else np.setdiff1d(np.arange(len(labels), dtype=np.int64), held)
    info = {
        "rule": "stratified_holdout",
        "part": part,
        "fraction": fraction,
        "seed": int(seed),
        "order": "splitmix64",
        "holdout_sha256": hashlib.sha256(np.asarray(held, "<i8").tobytes()).hexdigest(),
    }
    return Subset(source, idx, info=info)


def few_shot_subset(source, n_shot: float, seed: int = 0) -> Subset:
    """The original's `--n_shot` subset: the same number k of examples from every class.

    int n_shot: k = n_shot. float n_shot in (0, 1): k = int(n_shot * N / C) for N examples and C classes
    (BoB's `BaseJsonDataset`; a per-class fraction when classes are balanced). Each class's k are the
    first of its indices in SplitMix64 order of `seed`; returns sorted indices, recorded with their sha256.
    Raises ValueError naming the classes that have fewer than k examples.
    """
    if getattr(source, "multilabel", False):
        raise ValueError(
            "few_shot_subset needs single-label classes; multi-label sources (CheXpert) take a fraction "
            "of rows instead: chexpert_fraction_subset, or get_dataset('chexpert', 'train', n_shot=0.1)"
        )
    labels = np.asarray(source.labels())
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"few_shot_subset needs 1-D integer labels, got {labels.dtype} {labels.shape}")
    num_classes = int(source.num_classes)
    if isinstance(n_shot, (bool, np.bool_)) or not isinstance(n_shot, (int, float, np.integer, np.floating)):
        raise TypeError(f"n_shot must be an int (k per class) or a float in (0, 1), got {n_shot!r}")
    if isinstance(n_shot, (int, np.integer)):
        if n_shot < 1:
            raise ValueError(f"int n_shot is the number of examples per class and must be >= 1, got {n_shot}")
        k = int(n_shot)
    else:
        if not 0.0 < n_shot < 1.0:
            raise ValueError(
                f"float n_shot is a fraction in (0, 1), got {n_shot}; pass an int for k examples per class"
            )
        k = int(len(labels) * float(n_shot) / num_classes)
        if k < 1:
            raise ValueError(
                f"n_shot={n_shot} of {len(labels)} examples over {num_classes} classes is "
                f"int({n_shot} * {len(labels)} / {num_classes}) = 0 examples per class; use a larger fraction"
            )
    counts = np.bincount(labels, minlength=num_classes)
    short = np.flatnonzero(counts < k)
    if short.size:
        names = source.class_names
        listed = ", ".join(f"{c} ({names[c]!r}): {counts[c]}" for c in short[:10])
        more = f" and {short.size - 10} more" if short.size > 10 else ""
        raise ValueError(
            f"n_shot={n_shot} needs {k} examples of every class, but {short.size} classes have fewer: "
            f"{listed}{more}; use a smaller n_shot"
        )
    chosen = [_seeded_order(np.flatnonzero(labels == c), seed)[:k] for c in range(num_classes)]
    idx = np.sort(np.concatenate(chosen))
    info = {
        "rule": "few_shot",
        "n_shot": float(n_shot) if isinstance(n_shot, (float, np.floating)) else int(n_shot),
        "k_per_class": k,
        "seed": int(seed),
        "order": "splitmix64",
    }
    return Subset(source, idx, info=info)


def chexpert_fraction_subset(source, fraction: float, seed: int = CHEXPERT_BOB_SHUFFLE_SEED) -> Subset:
    """BoB's CheXpert `--n_shot`: the first int(fraction * N) rows after numpy's legacy shuffle with `seed`.

    The original (LibAUC-derived `CheXpert`) does `np.random.seed(123); np.random.shuffle(rows)` on the
    frontal rows and keeps the first `int(n_shot * N)`. numpy's legacy RandomState stream is frozen, so
    the chosen rows are the original's. Indices are returned sorted (order does not matter for training).
    """
    if isinstance(fraction, (bool, np.bool_, int, np.integer)) or not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"CheXpert n_shot is a fraction of rows in (0, 1], got {fraction!r}")
    order = np.arange(len(source), dtype=np.int64)
    np.random.RandomState(seed).shuffle(order)
    idx = np.sort(order[: int(float(fraction) * len(source))])
    info = {
        "rule": "chexpert_prefix",
        "n_shot": float(fraction),
        "seed": int(seed),
        "order": "numpy RandomState(seed).shuffle, first int(n_shot * N) rows (BoB/LibAUC)",
    }
    return Subset(source, idx, info=info)


# --------------------------------------------------------------------------------------------------
# Backends: (spec, split, data_dir) -> source
# --------------------------------------------------------------------------------------------------


def _load_tfds(spec: DatasetSpec, split: str, data_dir):
    src = TfdsSource(spec.tfds_name, spec.splits[split], data_dir=data_dir)
    if spec.holdout and split in spec.holdout["parts"]:
        rule = spec.holdout
        src = stratified_holdout(src, rule["parts"][split], fraction=rule["fraction"], seed=rule["seed"])
    return src


def _need_data_dir(spec: DatasetSpec, data_dir) -> Path:
    if data_dir is None:
        raise FileNotFoundError(
            f"{spec.name} is read from files, not tensorflow-datasets: pass data_dir=<folder holding it>"
        )
    return Path(data_dir).expanduser()


def _find_root(spec: DatasetSpec, data_dir, marker: str) -> Path:
    """data_dir or data_dir/<one of spec.folder_names> that contains `marker`."""
    base = _need_data_dir(spec, data_dir)
    candidates = [base] + [base / sub for sub in spec.folder_names]
    for root in candidates:
        if (root / marker).exists():
            return root
    raise FileNotFoundError(f"{spec.name}: no {marker!r} in any of {[str(c) for c in candidates]}")


def _read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _aircraft_official(root: Path, physical: str, variants: Sequence[str]) -> tuple[list[str], list[int]]:
    path = root / "data" / f"images_variant_{physical}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"fgvc_aircraft: {path} is missing")
    index = {v: i for i, v in enumerate(variants)}
    files, labels = [], []
    for line in _read_lines(path):
        image_id, _, variant = line.partition(" ")
        if variant not in index:
            raise ValueError(f"{path}: variant {variant!r} (image {image_id}) is not in data/variants.txt")
        files.append(f"{image_id}.jpg")
        labels.append(index[variant])
    return files, labels


def write_bob_aircraft_lists(root: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write BoB's `data/aircraft_list/{train,test}.txt` ('<file> <1-based label>') from the official lists.

    train.txt is the official train list followed by the val list, so its first 3,334 lines (BoB's train)
    are exactly the official train split and the rest the official val split; labels number the variants
    in data/variants.txt order. Returns the list folder.
    """
    root = Path(root).expanduser()
    variants = _read_lines(root / "data" / "variants.txt")
    out = root / "data" / "aircraft_list"
    texts = {}
    for name, parts in (("train.txt", ("train", "val")), ("test.txt", ("test",))):
        lines = []
        for part in parts:
            files, labels = _aircraft_official(root, part, variants)
            lines += [f"{f} {label + 1}" for f, label in zip(files, labels, strict=True)]
        texts[name] = "\n".join(lines) + "\n"
    for name, text in texts.items():
        if (out / name).exists() and not overwrite and (out / name).read_text() != text:
            raise FileExistsError(
                f"{out / name} exists with other content; pass overwrite=True to replace it"
            )
    out.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (out / name).write_text(text)
    return out


def _load_aircraft(spec: DatasetSpec, split: str, data_dir) -> FileListSource:
    root = _find_root(spec, data_dir, "data/images")
    variants_path = root / "data" / "variants.txt"
    if not variants_path.is_file():
        raise FileNotFoundError(f"fgvc_aircraft: {variants_path} is missing")
    variants = _read_lines(variants_path)
    bob_lists = root / "data" / "aircraft_list"
    if (bob_lists / "train.txt").is_file():
        list_path = bob_lists / ("test.txt" if split == "test" else "train.txt")
        lines = _read_lines(list_path)
        if split != "test":
            if len(lines) <= AIRCRAFT_BOB_TRAIN_LINES:
                raise ValueError(
                    f"{list_path} has {len(lines)} lines; BoB takes the first {AIRCRAFT_BOB_TRAIN_LINES} as "
                    "train and the rest as val, so it must hold train + val (6,667 lines). Rewrite it with "
                    "write_bob_aircraft_lists(root, overwrite=True)"
                )
            cut = AIRCRAFT_BOB_TRAIN_LINES
            lines = lines[:cut] if split == "train" else lines[cut:]
        files = [line.split(" ")[0] for line in lines]
        labels = [int(line.split(" ")[1]) - 1 for line in lines]
        origin = {
            "lists": "bob aircraft_list",
            "list_file": str(list_path),
            "list_sha256": _file_sha256(list_path),
        }
        if split != "test":
            origin["lines"] = (
                f"1-{AIRCRAFT_BOB_TRAIN_LINES}" if split == "train" else f"{AIRCRAFT_BOB_TRAIN_LINES + 1}-"
            )
    else:
        files, labels = _aircraft_official(root, split, variants)
        list_path = root / "data" / f"images_variant_{split}.txt"
        origin = {"lists": "official", "list_file": str(list_path), "list_sha256": _file_sha256(list_path)}
    return FileListSource(
        root / "data" / "images", files, labels, variants, name=spec.name, split=split, origin=origin
    )


def _strip_chexpert_prefix(path: str) -> str:
    for prefix in ("CheXpert-v1.0-small/", "CheXpert-v1.0/"):
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


def _load_chexpert(spec: DatasetSpec, split: str, data_dir) -> FileListSource:
    from bob_jax.evaluate.multilabel import (
        CHEXPERT_LABELS,
        CHEXPERT_UNCERTAIN_TO,
        chexpert_targets_from_csv_rows,
    )

    csv_name = spec.splits[split]
    root = _find_root(spec, data_dir, csv_name)
    csv_path = root / csv_name
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for column in ("Path", "Frontal/Lateral"):
        if rows and column not in rows[0]:
            raise ValueError(f"{csv_path}: no {column!r} column; is this a CheXpert train/valid CSV?")
    frontal = [row for row in rows if row["Frontal/Lateral"] == "Frontal"]
    targets = chexpert_targets_from_csv_rows(frontal, CHEXPERT_LABELS)
    origin = {
        "csv": str(csv_path),
        "csv_sha256": _file_sha256(csv_path),
        "csv_rows": len(rows),
        "frontal_only": True,
        "uncertain_to": dict(CHEXPERT_UNCERTAIN_TO),
    }
    files = [_strip_chexpert_prefix(row["Path"]) for row in frontal]
    return FileListSource(
        root, files, targets, CHEXPERT_LABELS, name=spec.name, split=split, origin=origin, multilabel=True
    )


def _check_classes(spec: DatasetSpec, src, expected: Sequence[str] | None = None):
    if expected is not None and tuple(src.class_names) != tuple(expected):
        raise ValueError(
            f"{spec.name}: class folders {list(src.class_names)} differ from the expected {list(expected)}"
        )
    if src.num_classes != spec.num_classes:
        raise ValueError(
            f"{spec.name}: {src!r} has {src.num_classes} classes, expected {spec.num_classes}; wrong folder?"
        )
    return src


def _load_visda(spec: DatasetSpec, split: str, data_dir) -> ImageFolder:
    physical = spec.splits[split]
    root = _find_root(spec, data_dir, physical)
    return _check_classes(spec, ImageFolder(root / physical), VISDA_CLASSES)


def _load_cub(spec: DatasetSpec, split: str, data_dir):
    if split == "all":
        root = _find_root(spec, data_dir, "images")
        return _check_classes(spec, ImageFolder(root / "images"))
    root = _find_root(spec, data_dir, "images.txt")

    def table(name: str) -> dict[str, str]:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"cub200_2011: {path} is missing")
        return dict(line.split(" ", 1) for line in _read_lines(path))

    paths, labels, is_train = (
        table("images.txt"),
        table("image_class_labels.txt"),
        table("train_test_split.txt"),
    )
    classes = table("classes.txt")
    class_names = [classes[k] for k in sorted(classes, key=int)]
    if set(paths) != set(labels) or set(paths) != set(is_train):
        raise ValueError(
            f"{root}: images.txt, image_class_labels.txt and train_test_split.txt list different ids"
        )
    want = "1" if split == "train" else "0"
    ids = sorted((i for i in paths if is_train[i] == want), key=int)
    origin = {"lists": "images.txt + train_test_split.txt", "list_sha256": _file_sha256(root / "images.txt")}
    src = FileListSource(
        root / "images",
        [paths[i] for i in ids],
        [int(labels[i]) - 1 for i in ids],
        class_names,
        name=spec.name,
        split=split,
        origin=origin,
    )
    return _check_classes(spec, src)


def _load_class_folders(spec: DatasetSpec, split: str, data_dir) -> ImageFolder:
    base = _need_data_dir(spec, data_dir)
    candidates = [base / sub for sub in spec.folder_names] + [base]
    root = next((c for c in candidates if c.is_dir()), None)
    if root is None:
        raise FileNotFoundError(f"{spec.name}: none of {[str(c) for c in candidates]} is a directory")
    return _check_classes(spec, ImageFolder(root))


_BACKENDS = {
    "tfds": _load_tfds,
    "aircraft": _load_aircraft,
    "chexpert": _load_chexpert,
    "visda": _load_visda,
    "cub": _load_cub,
    "class_folders": _load_class_folders,
}


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def get_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    n_shot: float | None = None,
    seed: int | None = None,
) -> BenchmarkSource | Subset:
    """A registered dataset's logical `split` as a source (see the module docstring for the rules).

    data_dir: the tfds data_dir for tfds-backed sets (None: TFDS_DATA_DIR or tfds' default), else the
    folder holding the dataset (or its parent; `spec.folder_names` are searched).
    n_shot / seed: few-shot subset of the split (`few_shot_subset`, seed 0 by default; CheXpert:
    `chexpert_fraction_subset`, BoB's seed 123 by default). Recorded in `describe()["subset"]`.
    """
    spec = get_spec(name)
    spec.check_split(split)
    try:
        base = _BACKENDS[spec.backend](spec, split, data_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"benchmark dataset {spec.name!r} ({spec.title}) split {split!r} -> {spec.splits[split]!r} is not "
            f"available: {e}\n\nHow to get it:\n{spec.prepare_text(data_dir)}"
        ) from e
    if int(base.num_classes) != spec.num_classes:
        raise ValueError(
            f"{spec.name}: the data has {base.num_classes} classes, the benchmark expects {spec.num_classes} "
            "(wrong dataset or version)"
        )
    source = BenchmarkSource(base, spec, split)
    if n_shot is None:
        return source
    if spec.few_shot == "chexpert_prefix":
        return chexpert_fraction_subset(source, n_shot, CHEXPERT_BOB_SHUFFLE_SEED if seed is None else seed)
    return few_shot_subset(source, n_shot, 0 if seed is None else seed)
