"""The detection job (`config.job = "detection"`): train one detector, evaluate it, write result records.

One run = one backbone x head x trunk protocol on one training set. Records (the results store, ranked by
`python -m bob_jax.report` with every other task):
  * "detection": COCO bbox AP (primary) and AP50/AP75/APs/APm/APl on the test set;
  * "instance_segmentation": COCO segm AP on the same set (mask heads only);
  * "ood_detection": bbox AP on the domain-shifted set (the synthetic twin; Cityscapes for the original's
    Sim10k -> Cityscapes protocol), with the clean bbox AP beside it when a test set exists.
The head and the trunk protocol define the setting, so they are part of each record's dataset name
(`<dataset>/<head>/<frozen|finetune>`): the ranking never averages Mask R-CNN with Cascade numbers, nor
frozen with fine-tuned ones. A plain ViT with the original's pyramid (`neck="bob"`) is labelled
`<label>+bob_neck` (a different detector on the same backbone).

Datasets (`config.dataset`):
  * `synthetic` (default): the embedded shapes set, written under `<workdir>/data` on first use: train
    (`num_train` images, seed 0), test (`num_test`, seed 1) and the shifted twin of the test set (same
    scenes in another look: a pure appearance shift);
  * `coco:<annotations.json>:<image_dir>`: any COCO-format set for training; `test` and `ood` take the
    same form ("" for none; at least one is needed). `category_names` selects classes (the OOD protocol:
    `("car",)` for Sim10k -> Cityscapes with `head="cascade_rcnn"`).
Each finished record is skipped on rerun (unless `force`); training checkpoints under
`<workdir>/runs/<key>` make an interrupted run resume, and a finished one restore without training.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Any

import ml_collections

from bob_jax import parallel
from bob_jax.results import ResultsStore, run_key

SYNTHETIC = "synthetic"
SYNTHETIC_NAME = "synthetic_shapes"
TASKS = ("detection", "instance_segmentation", "ood_detection")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """One evaluation or training set: its `CocoDetection` and the name recorded for it."""

    source: Any
    name: str
    split: str


def _coco_spec(spec: str, *, category_names, with_masks: bool, filter_empty: bool):
    from bob_jax.detection.data import CocoDetection

    kind, _, rest = spec.partition(":")
    ann, sep, image_dir = rest.rpartition(":")
    if kind != "coco" or not sep or not ann or not image_dir:
        raise ValueError(f"dataset {spec!r}: write 'coco:<annotations.json>:<image_dir>' (or 'synthetic')")
    return CocoDetection(ann, image_dir, category_names=category_names or None, with_masks=with_masks,
                         filter_empty=filter_empty)


def _set_name(source) -> str:
    """A COCO-format set's name: its json's stem (instances_val2017), or the folder holding a generically
    named json (<name>/annotations.json, as `synthetic.write_coco_dataset` writes)."""
    path = pathlib.Path(source.ann_json)
    return path.parent.name if path.stem == "annotations" else path.stem


def load_datasets(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, *, with_masks: bool, image_size: int):
    """(train, test or None, ood or None) as `DataSpec`s for the `dataset` config section; the synthetic
    set is drawn at `image_size` (the detector's input)."""
    from bob_jax.detection.data import CocoDetection
    from bob_jax.detection.synthetic import write_coco_dataset

    names = tuple(cfg.category_names) or None
    if cfg.name == SYNTHETIC:
        if names:
            raise ValueError("category_names selects classes of COCO-format sets; the synthetic set has all five")
        root, size = workdir / "data" / SYNTHETIC_NAME, int(image_size)
        train = write_coco_dataset(root, "train", cfg.num_train, seed=cfg.seed, size=size)
        test = write_coco_dataset(root, "test", cfg.num_test, seed=cfg.seed + 1, size=size)
        twin = write_coco_dataset(root, "shifted", cfg.num_test, seed=cfg.seed + 1, size=size, shift=True)
        kw = {"with_masks": with_masks}
        return (DataSpec(CocoDetection(*train, filter_empty=True, **kw), SYNTHETIC_NAME, "train"),
                DataSpec(CocoDetection(*test, **kw), SYNTHETIC_NAME, "test"),
                DataSpec(CocoDetection(*twin, **kw), f"{SYNTHETIC_NAME}~shifted", "shifted"))

    def load(spec: str, filter_empty: bool):
        return _coco_spec(spec, category_names=names, with_masks=with_masks, filter_empty=filter_empty)

    train = load(cfg.name, True)
    base = cfg.dataset_name or _set_name(train)
    test = None
    if cfg.test:
        test_source = load(cfg.test, False)
        test = DataSpec(test_source, base, _set_name(test_source))
    ood = None
    if cfg.ood:
        ood_source = load(cfg.ood, False)
        ood = DataSpec(ood_source, f"{base}~{cfg.ood_name or _set_name(ood_source)}", "ood")
    if test is None and ood is None:
        raise ValueError("a COCO-format training set needs dataset.test and/or dataset.ood to evaluate on")
    for spec in (test, ood):
        if spec is not None and spec.source.class_names != train.class_names:
            raise ValueError(
                f"{spec.source.ann_json} has classes {spec.source.class_names}, the training set "
                f"{train.class_names}: select the shared ones with dataset.category_names"
            )
    return DataSpec(train, base, "train"), test, ood


def detector_config(config: ml_collections.ConfigDict, name: str, weights, num_classes: int):
    from bob_jax.detection.model import DetectorConfig

    fields = {f.name for f in dataclasses.fields(DetectorConfig)}
    values = config.model.to_dict()
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"config.model has unknown field(s) {unknown}; DetectorConfig accepts {sorted(fields)}")
    return DetectorConfig(backbone=name, weights=weights, num_classes=num_classes, seed=config.seed, **values)


def train_config(config: ml_collections.ConfigDict, num_train: int):
    """`config.train` as a TrainConfig; `steps=0` means `epochs` passes over the training set (the
    original: 36 epochs)."""
    from bob_jax.detection.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = config.train.to_dict()
    epochs = values.pop("epochs", 36)
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"config.train has unknown field(s) {unknown}; TrainConfig accepts {sorted(fields)} "
                         "and epochs")
    if not values.get("steps"):
        values["steps"] = max(1, math.ceil(epochs * num_train / values["batch_size"]))
    return TrainConfig(seed=config.seed, **values)


def _records_todo(writer, keys: dict[str, str], what: str) -> list[str]:
    return [task for task, key in keys.items() if not writer.skip(key, f"{what} / {task}")]


def run(config: ml_collections.ConfigDict, workdir, console=None, *, report: bool = True) -> dict[str, Any]:
    """Train and evaluate the detector `config` describes; returns {"paths": report files, "records"}."""
    from bob_jax.backbones import list_backbones
    from bob_jax.battle import _gflops, _Writer, parse_backbone, parse_mesh
    from bob_jax.detection.model import Detector, num_params
    from bob_jax.detection.train import train
    from bob_jax.report import write_report

    workdir = pathlib.Path(workdir)
    name, weights, label = parse_backbone(config.backbone, config.weights)
    if name not in list_backbones():
        raise ValueError(f"unknown backbone {name!r}; choose one of bob_jax.backbones.list_backbones()")
    head, neck = config.model.head, config.model.neck
    with_masks = head != "cascade_rcnn"
    train_set, test_set, ood_set = load_datasets(config.dataset, workdir, with_masks=with_masks,
                                                 image_size=config.model.image_size)
    model_cfg = detector_config(config, name, weights, train_set.source.num_classes)
    train_cfg = train_config(config, len(train_set.source))
    t0 = time.time()
    model = Detector(model_cfg)
    build_seconds = time.time() - t0
    if model.plain_vit and neck == "bob":
        label = f"{label}+bob_neck"
    writer = _Writer(ResultsStore(workdir), config, console)
    setting = f"/{head}/{train_cfg.protocol}"
    hparams = {
        "model": {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in ("backbone", "weights")},
        "train": dataclasses.asdict(train_cfg), "train_source": train_set.source.describe(),
    }

    def key(task, data: DataSpec):
        split = f"{train_set.split}->{data.split}"
        hp = {**hparams, "eval_source": data.source.describe()}
        return run_key(label, model.weights_id, task, data.name + setting, split, config.protocol, config.seed, hp)

    keys = {}
    if test_set is not None:
        keys["detection"] = key("detection", test_set)
        if with_masks:
            keys["instance_segmentation"] = key("instance_segmentation", test_set)
    if ood_set is not None:
        keys["ood_detection"] = key("ood_detection", ood_set)
    todo = _records_todo(writer, keys, label + setting)
    if todo:
        mesh = parallel.make_mesh(parse_mesh(config.mesh))
        run_dir = workdir / "runs" / next(iter(keys.values()))
        trained = train(model, train_set.source, train_cfg, mesh=mesh, workdir=str(run_dir),
                        progress=config.progress)
        common = {
            "backbone": label, "backbone_name": name, "weights": model.weights_id, "input_size": model_cfg.image_size,
            "preprocess": model.preprocess.to_dict(), "dtype": "float32", "num_params": num_params(model.trunk),
            "detector_num_params": num_params(model), "gflops": _gflops(name, model_cfg.image_size),
            "train": {"steps": trained.steps, "resumed_from": trained.resumed_from, "losses": trained.losses,
                      "step_seconds": trained.step_seconds, "build_seconds": build_seconds},
        }
        clean_ap = None
        if test_set is not None:
            if {"detection", "instance_segmentation"} & set(todo):
                clean_ap = _evaluate_and_write(writer, trained, test_set, config, keys, common, hparams,
                                               train_set, setting, mesh, todo)["bbox"]["AP"]
            else:  # only the OOD record is missing: the clean AP is in the store
                clean_ap = writer.store.read(keys["detection"])["metrics"]["AP"]
        if ood_set is not None and "ood_detection" in todo:
            t = time.time()
            metrics = trained.evaluate(ood_set.source, batch_size=config.eval_batch_size, mesh=mesh,
                                       num_threads=train_cfg.num_threads)
            values = dict(metrics["bbox"])
            if clean_ap is not None:
                values["clean_AP"] = clean_ap
            writer.write({
                **common, "key": keys["ood_detection"], "task": "ood_detection", "dataset": ood_set.name + setting,
                "split": f"{train_set.split}->{ood_set.split}", "primary_metric": "AP", "metrics": values,
                "hparams": {**hparams, "eval_source": ood_set.source.describe()},
                "num_eval": metrics["num_images"],
                "wall_time_s": {"train": trained.train_seconds, "eval": time.time() - t},
            })
    records = writer.store.records()
    paths = write_report(records, workdir / "report", console=console) if report else {}
    return {"paths": paths, "records": records}


def _evaluate_and_write(writer, trained, test_set, config, keys, common, hparams, train_set, setting, mesh,
                        todo) -> dict[str, Any]:
    t = time.time()
    metrics = trained.evaluate(test_set.source, batch_size=config.eval_batch_size, mesh=mesh,
                               num_threads=config.train.num_threads)
    seconds = time.time() - t
    for task, iou_type in (("detection", "bbox"), ("instance_segmentation", "segm")):
        if task not in todo:
            continue
        writer.write({
            **common, "key": keys[task], "task": task, "dataset": test_set.name + setting,
            "split": f"{train_set.split}->{test_set.split}", "primary_metric": "AP",
            "metrics": dict(metrics[iou_type]), "hparams": {**hparams, "eval_source": test_set.source.describe()},
            "num_eval": metrics["num_images"],
            "wall_time_s": {"train": trained.train_seconds, "eval": seconds},
        })
    return metrics
