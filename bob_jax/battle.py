"""The battle job: a list of backbones through a list of frozen-feature tasks, then the ranking.

For each backbone, features of the train and test sets are extracted once and shared by every
task; each (backbone, task) result is one record in the results store, keyed by everything that
defines it, so a finished run is skipped on restart (unless `force`) and many machines can write
into one store. The job ends by ranking every record in the store with per-setting z-scores.
"""

from __future__ import annotations

import logging
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from bob_jax import backbones, parallel
from bob_jax.backbones.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from bob_jax.features import extract_features
from bob_jax.frozen import TASKS
from bob_jax.results import ResultsStore, environment_info, run_key

log = logging.getLogger(__name__)

RANDOM = "random"


def parse_backbone(spec: str, override: str = "") -> tuple[str, str | None, str]:
    """`name@weights` -> (name, weights for create(), label used in results and rankings).

    weights: `pretrained` (default), `random` (alias `none`: the source framework's random init) or
    a file path; a non-empty `override` (config.weights) replaces every entry's weights.
    Random-init models are labelled `name@random` so they never merge with the pretrained ones.
    """
    name, _, weights = spec.partition("@")
    weights = override or weights or "pretrained"
    if weights in (RANDOM, "none"):
        return name, None, f"{name}@{RANDOM}"
    if weights == "pretrained":
        return name, "pretrained", name
    return name, weights, f"{name}@{pathlib.Path(weights).name}"


def backbone_preprocess(model, config: ml_collections.ConfigDict) -> Preprocess:
    """The backbone's own transform, at the config's input size, optionally with ImageNet stats
    (the original linear probe normalised every model with ImageNet mean/std)."""
    pre = model.preprocess
    if config.input_size:
        pre = pre.replace(input_size=int(config.input_size))
    if config.normalization == "imagenet":
        pre = pre.replace(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    elif config.normalization != "backbone":
        raise ValueError(f"normalization={config.normalization!r}: use 'backbone' or 'imagenet'")
    return pre


def input_size_kwargs(name: str, config: ml_collections.ConfigDict) -> dict[str, int]:
    """Token and window models are built for their input size (timm's `img_size`); with pretrained
    weights the family's checkpoint filter resamples position tables to it."""
    family = backbones.zoo.ARCH_TO_FAMILY.get(name.partition(".")[0])
    if config.input_size and family is not None and "img_size" in family.arch_kwargs:
        return {"img_size": int(config.input_size)}
    return {}


def load_data(cfg: ml_collections.ConfigDict):
    from bob_jax.data.sources import get_source, seeded_subset

    kw = {"data_dir": cfg.data_dir or None}
    train = get_source(cfg.name, cfg.train_split, **kw)
    test = get_source(cfg.name, cfg.test_split, **kw)
    if cfg.train_size:
        train = seeded_subset(train, cfg.train_size, seed=cfg.seed)
    if cfg.test_size:
        test = seeded_subset(test, cfg.test_size, seed=cfg.seed + 1)
    return train, test


def parse_mesh(spec: str) -> dict[str, int] | None:
    """`"data=4,model=2"` -> {"data": 4, "model": 2}; empty -> None (all devices on "data")."""
    if not spec:
        return None
    return {k.strip(): int(v) for k, v in (item.split("=") for item in spec.split(","))}


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, console=None) -> dict[str, Any]:
    """Run the battle described by `config` into `workdir`; returns the report paths and ranking."""
    from bob_jax.report import write_report

    workdir = pathlib.Path(workdir)
    store = ResultsStore(workdir)
    unknown = [t for t in config.tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; available: {sorted(TASKS)}")
    known = backbones.list_backbones()
    specs = [parse_backbone(spec, config.weights) for spec in config.backbones]
    bad = [name for name, _, _ in specs if name not in known]
    if bad:
        raise ValueError(f"unknown backbone(s) {bad}; entries are 'arch.tag@weights' with arch.tag one of {known}")
    # Fail before any work when a checkpoint is unavailable (offline, no cache, missing file).
    for name, weights, _ in specs:
        if weights == "pretrained":
            backbones.resolve_pretrained_file(backbones.ZOO[name])
        elif weights is not None and not pathlib.Path(weights).exists():
            raise FileNotFoundError(f"{name}: weights file {weights} does not exist")
    mesh = parallel.make_mesh(parse_mesh(config.mesh))
    train_src, test_src = load_data(config.dataset)
    num_classes = int(train_src.num_classes)
    env = environment_info()
    dataset = config.dataset.name
    split = f"{config.dataset.train_split}->{config.dataset.test_split}"

    for name, weights, label in specs:
        t0 = time.time()
        model = backbones.create(name, weights=weights, seed=config.seed, num_classes=0,
                                 **input_size_kwargs(name, config))
        pre = backbone_preprocess(model, config)
        num_params = int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
        common = {
            "input_size": pre.input_size, "normalization": config.normalization,
            "train_source": train_src.describe(), "test_source": test_src.describe(),
        }
        pending = []
        for task in config.tasks:
            hparams = {**common, "task": config[task].to_dict()}
            key = run_key(label, model.weights_id, task, dataset, split, config.protocol, config.seed, hparams)
            if config.force or not store.exists(key):
                pending.append((task, key, hparams))
            elif console is not None:
                console.print(f"{label} / {task}: finished earlier ({key}), skipped", markup=False)
        if not pending:
            continue
        feature_kw = dict(preprocess=pre, batch_size=config.batch_size, mesh=mesh,
                          cache_dir=workdir / "features", num_workers=config.num_workers,
                          progress=config.progress)
        train = extract_features(model, train_src, description=f"{label} train", **feature_kw)
        test = extract_features(model, test_src, description=f"{label} test", **feature_kw)
        extract_s = time.time() - t0
        for task, key, hparams in pending:
            t1 = time.time()
            metrics, per_example = TASKS[task].run(
                train, test, num_classes=num_classes, cfg=config[task], mesh=mesh,
                workdir=str(workdir / "runs" / key), progress=config.progress,
            )
            store.write({
                "key": key, "backbone": label, "backbone_name": name, "weights": model.weights_id,
                "task": task, "dataset": dataset, "split": split, "protocol": config.protocol,
                "seed": config.seed, "primary_metric": TASKS[task].primary_metric, "metrics": metrics,
                "hparams": hparams, "config": config.to_dict(), "input_size": pre.input_size,
                "preprocess": pre.to_dict(), "dtype": "float32", "feature_dim": int(train.features.shape[1]),
                "wall_time_s": {"task": time.time() - t1, "features": extract_s,
                                "features_cached": bool(train.cached and test.cached)},
                "device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
                "environment": env, "num_params": num_params,
                "metrics_per_example": None if per_example is None else [float(v) for v in per_example],
            })
            line = f"{label} / {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            log.info(line)
            if console is not None:
                console.print(line, markup=False, highlight=False)

    records = store.records()
    paths = write_report(records, workdir / "report", console=console)
    return {"paths": paths, "records": records}


def summarize(records: list[Mapping[str, Any]]) -> str:
    """One line per (backbone, task): the primary metric, for logs and closing notes."""
    rows = sorted((r["backbone"], r["task"], r["metrics"].get(r["primary_metric"])) for r in records)
    return "\n".join(f"{b:45s} {t:14s} {v:.4f}" for b, t, v in rows)
