"""The battle job: a list of backbones through a list of frozen-feature tasks, then the ranking.

For each backbone, features of the train and test sets are extracted once and shared by every
task; each (backbone, task) result is one record in the results store, keyed by everything that
defines it, so a finished run is skipped on restart (unless `force`) and many machines can write
into one store. The job ends by ranking every record in the store with per-setting z-scores.
"""

from __future__ import annotations

import dataclasses
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
from bob_jax.frozen import TASKS, DataSplits
from bob_jax.results import ResultsStore, environment_info, run_key

log = logging.getLogger(__name__)

RANDOM = "random"


def parse_backbone(spec: str, override: str = "") -> tuple[str, str | None, str]:
    """`[label=]name@weights` -> (name, weights for create(), label used in results and rankings).

    weights: `pretrained` (default), `random` (alias `none`: the source framework's random init) or
    a file path; a non-empty `override` (config.weights) replaces every entry's weights. The label is
    the zoo name unless given (a pool name such as `vit_base_in1k`, under which the `bob` config set
    files per-task checkpoints). Random-init models are labelled `<label>@random` so they never merge
    with the pretrained ones.
    """
    label, eq, rest = spec.partition("=")
    if not eq:
        label, rest = "", spec
    name, _, weights = rest.partition("@")
    label = label or name
    weights = override or weights or "pretrained"
    if weights in (RANDOM, "none"):
        return name, None, f"{label}@{RANDOM}"
    if weights == "pretrained":
        return name, "pretrained", label
    return name, weights, f"{label}@{pathlib.Path(weights).name}"


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


@dataclasses.dataclass(frozen=True)
class Data:
    """The job's train and evaluation sources and how they were split (recorded in every result)."""

    train: Any
    test: Any
    split: str
    name: str  # the setting's dataset name: the dataset, plus `/<k>shot` or `/<f>frac` for few-shot

    @property
    def num_classes(self) -> int:
        return int((self.train if self.train is not None else self.test).num_classes)


def load_data(cfg: ml_collections.ConfigDict, *, train: bool = True) -> Data:
    """`train=False`: only the evaluation source (query/database protocols; `Data.train` is None)."""
    from bob_jax.data.sources import get_source, seeded_subset

    kw = {"data_dir": cfg.data_dir or None}
    test = get_source(cfg.name, cfg.test_split, **kw)
    if cfg.test_size:
        test = seeded_subset(test, cfg.test_size, seed=cfg.seed + 1)
    if not train:
        return Data(None, test, cfg.test_split, cfg.name)
    n_shot = float(cfg.n_shot)  # k per class (>= 1) or a per-class fraction (< 1) of the training split
    train_kw = {**kw, "n_shot": int(n_shot) if n_shot >= 1 else n_shot} if n_shot else kw
    train = get_source(cfg.name, cfg.train_split, **train_kw)
    if cfg.train_size:
        train = seeded_subset(train, cfg.train_size, seed=cfg.seed)
    name = cfg.name
    if n_shot:
        name += f"/{int(n_shot)}shot" if n_shot >= 1 else f"/{n_shot:g}frac"
    return Data(train, test, f"{cfg.train_split}->{cfg.test_split}", name)


def _needs_train(config: ml_collections.ConfigDict, frozen: list[str]) -> bool:
    """Whether a task reads the train split: every trained task, and frozen tasks that say so (query/database
    retrieval protocols read only the evaluation source, which may have no train split at all)."""
    return any(t not in TASKS for t in config.tasks) or any(TASKS[t].train_needed(config[t]) for t in frozen)


def parse_mesh(spec: str) -> dict[str, int] | None:
    """`"data=2,fsdp=4"` -> {"data": 2, "fsdp": 4}; empty -> None (all devices on "data").
    See `parallel.parse_mesh_spec`."""
    return parallel.parse_mesh_spec(spec)


def _check_weights(specs) -> None:
    """Fail before any work when a checkpoint is unavailable (offline, no cache, missing file)."""
    for name, weights, _ in specs:
        if weights == "pretrained":
            backbones.resolve_pretrained_file(backbones.ZOO[name])
        elif weights is not None and not pathlib.Path(weights).exists():
            raise FileNotFoundError(f"{name}: weights file {weights} does not exist")


def _specs(config: ml_collections.ConfigDict) -> list[tuple[str, str | None, str]]:
    from bob_jax.trained import TRAINED_TASKS

    unknown = [t for t in config.tasks if t not in TASKS and t not in TRAINED_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; available: {sorted({*TASKS, *TRAINED_TASKS})}")
    known = backbones.list_backbones()
    specs = [parse_backbone(spec, config.weights) for spec in config.backbones]
    bad = [name for name, _, _ in specs if name not in known]
    if bad:
        raise ValueError(f"unknown backbone(s) {bad}; entries are 'arch.tag@weights' with arch.tag one of {known}")
    _check_weights(specs)
    return specs


class _Writer:
    """Writes one record per finished (backbone, task, setting) and prints its line.

    Multi-host: every process runs the same tasks (their steps are collective), so whether a record
    exists is decided by process 0 and broadcast, and only process 0 writes records and prints."""

    def __init__(self, store: ResultsStore, config, console):
        self.store, self.config, self.console = store, config, console
        self.env = environment_info()
        self.primary = jax.process_index() == 0

    def skip(self, key: str, what: str) -> bool:
        done = not self.config.force and self.store.exists(key)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            # The same answer on every process, also while process 0 is writing this very record.
            done = bool(multihost_utils.broadcast_one_to_all(np.asarray(done)))
        if not done:
            return False
        if self.console is not None and self.primary:
            self.console.print(f"{what}: finished earlier ({key}), skipped", markup=False)
        return True

    def write(self, record: dict[str, Any]) -> None:
        if not self.primary:
            return
        record = {
            "seed": self.config.seed, "protocol": self.config.protocol, "config": self.config.to_dict(),
            "device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
            "environment": self.env, **record,
        }
        self.store.write(record)
        # Headline metrics only: per-head / per-label details (`name/...`) stay in the record.
        line = f"{record['backbone']} / {record['task']} / {record['dataset']}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in record["metrics"].items() if isinstance(v, float) and "/" not in k
        )
        log.info(line)
        if self.console is not None:
            self.console.print(line, markup=False, highlight=False)


def _gflops(name: str, input_size: int) -> float | None:
    try:
        from bob_jax.bench.flops import analytic_gflops
    except ImportError:  # the analytic counter is optional for the job
        return None
    try:
        return float(analytic_gflops(name, input_size))
    except (KeyError, NotImplementedError, ValueError):
        return None


def _run_frozen(name, weights, label, tasks, config, data, mesh, workdir, writer) -> None:
    """Frozen-feature tasks of one backbone: each distinct feature output is extracted once."""
    model = backbones.create(name, weights=weights, seed=config.seed, num_classes=0,
                             **input_size_kwargs(name, config))
    pre = backbone_preprocess(model, config)
    num_params = int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
    common = {"input_size": pre.input_size, "normalization": config.normalization,
              "train_source": None if data.train is None else data.train.describe(),
              "test_source": data.test.describe()}
    pending = []
    for task in tasks:
        spec = TASKS[task]
        output = spec.output_for(model, config[task])
        hparams = {**common, "task": config[task].to_dict(), "output": output}
        key = run_key(label, model.weights_id, task, data.name, data.split, config.protocol,
                      config.seed, hparams)
        if not writer.skip(key, f"{label} / {task}"):
            pending.append((spec, output, key, hparams))
    if not pending:
        return
    feature_kw = dict(preprocess=pre, batch_size=config.batch_size, mesh=mesh, cache_dir=workdir / "features",
                      num_workers=config.num_workers, progress=config.progress)
    extracted, seconds, with_head = {}, {}, []

    def model_for(output: str):
        # "logits" (the original's retrieval descriptor of CLIP ResNets and MiDaS) needs the head that the
        # trunk model above is built without; built once, only then.
        if output != "logits":
            return model
        if not with_head:
            with_head.append(backbones.create(name, weights=weights, seed=config.seed,
                                              **input_size_kwargs(name, config)))
        return with_head[0]

    def features(split: str, output: str):
        if (split, output) not in extracted:
            t = time.time()
            suffix = "" if output == "pooled" else f" {output}"
            extracted[split, output] = extract_features(
                model_for(output), getattr(data, split), output=output,
                description=f"{label} {split}{suffix}", **feature_kw)
            seconds[split, output] = time.time() - t
        return extracted[split, output]

    for spec, output, key, hparams in pending:
        needs_train = spec.train_needed(config[spec.name])
        test = features("test", output)
        train = features("train", output) if needs_train else None
        used = [("test", output)] + ([("train", output)] if needs_train else [])
        t = time.time()
        metrics, per_example = spec.run(
            train, test, num_classes=data.num_classes, cfg=config[spec.name], mesh=mesh,
            workdir=str(workdir / "runs" / key), progress=config.progress,
            sources=DataSplits(data.train, data.test),
        )
        writer.write({
            "key": key, "backbone": label, "backbone_name": name, "weights": model.weights_id,
            "task": spec.name, "dataset": data.name, "split": data.split,
            "primary_metric": spec.primary_for(config[spec.name]), "metrics": metrics, "hparams": hparams,
            "input_size": pre.input_size, "preprocess": pre.to_dict(), "dtype": "float32",
            "feature_dim": int(test.features.shape[1]), "num_params": num_params,
            "gflops": _gflops(name, pre.input_size),
            # Feature time is that of the features this task read (extracted once, shared by tasks).
            "wall_time_s": {"task": time.time() - t, "features": sum(seconds[u] for u in used),
                            "features_cached": all(extracted[u].cached for u in used)},
            "metrics_per_example": None if per_example is None else [float(v) for v in per_example],
        })


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, console=None, *,
        report: bool = True) -> dict[str, Any]:
    """Run the battle described by `config` into `workdir`; returns the report paths (when `report`:
    every record of the store ranked) and the store's records."""
    from bob_jax import trained
    from bob_jax.report import write_report

    workdir = pathlib.Path(workdir)
    specs = _specs(config)
    writer = _Writer(ResultsStore(workdir), config, console)
    mesh = parallel.make_mesh(parse_mesh(config.mesh))
    frozen = [t for t in config.tasks if t in TASKS]
    data = load_data(config.dataset, train=_needs_train(config, frozen))
    # Fine-tuning and OOD evaluation of the fine-tuned classifier share one training run.
    trained_tasks = [t for t in config.tasks if t in trained.TRAINED_TASKS]
    for name, weights, label in specs:
        if frozen:
            _run_frozen(name, weights, label, frozen, config, data, mesh, workdir, writer)
        if trained_tasks:
            trained.run(name, weights, label, trained_tasks, config=config, data=data, mesh=mesh,
                        workdir=workdir, writer=writer)
    records = writer.store.records()
    primary = jax.process_index() == 0  # the other processes wrote nothing either
    paths = write_report(records, workdir / "report", console=console) if report and primary else {}
    return {"paths": paths, "records": records}


def summarize(records: list[Mapping[str, Any]]) -> str:
    """One line per (backbone, task): the primary metric, for logs and closing notes."""
    rows = sorted((r["backbone"], r["task"], r["metrics"].get(r["primary_metric"])) for r in records)
    return "\n".join(f"{b:45s} {t:14s} {v:.4f}" for b, t, v in rows)
