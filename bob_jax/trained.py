"""Tasks that train the backbone: end-to-end fine-tuning, and OOD evaluation of the fine-tuned model.

`finetune` fine-tunes every parameter on the job's train split (BoB's recipe, `tasks/finetune.py`) and
records the clean test accuracy; `ood` evaluates that same fine-tuned classifier on shifted test sets
(bob-spec 3.5), one record per shifted set, each a setting of its own in the ranking. Both come from one
training run: asking for `ood` alone still trains (and records the clean result beside the shifted ones).

Shifted sets (`config.ood.shifts`) are written as
  * `<corruption>@<severity>`: the job's own test split under a fixed, seeded corruption
    (`bob_jax.data.corruptions`; the offline OOD path), e.g. `gaussian_noise@3`;
  * `<dataset>[<split>]` (split `test` when omitted): another dataset by name (e.g. `imagenet_a`,
    `imagenet_v2/matched-frequency`, `folder:/data/visda/real[val]`); for ImageNet-A/-R only the 200 covered classes' logits are kept and
    1000-class labels become positions among them, as the original's `--valid_labels` masks do.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import time
import jax
import ml_collections
import numpy as np
from flax import nnx

from bob_jax.results import run_key

TRAINED_TASKS = ("finetune", "ood")


@dataclasses.dataclass(frozen=True)
class Shift:
    """One OOD evaluation set: `name` (the setting's dataset suffix) and how to build it."""

    name: str
    corruption: str | None = None
    severity: int = 0
    dataset: str | None = None
    split: str = "test"


def parse_shift(spec: str) -> Shift:
    from bob_jax.data.corruptions import CORRUPTIONS

    spec = spec.strip()
    corruption, at, severity = spec.partition("@")
    if at:
        if corruption not in CORRUPTIONS:
            raise ValueError(f"ood shift {spec!r}: unknown corruption {corruption!r}; choose one of {CORRUPTIONS}")
        if not severity.isdigit() or not 1 <= int(severity) <= 5:
            raise ValueError(f"ood shift {spec!r}: severity must be an integer in 1..5")
        return Shift(spec, corruption=corruption, severity=int(severity))
    if not spec:
        raise ValueError("empty ood shift; write '<corruption>@<severity>' or '<dataset>[<split>]'")
    m = re.fullmatch(r"(.+?)(?:\[([\w.-]+)\])?", spec)
    return Shift(spec, dataset=m.group(1), split=m.group(2) or "test")


def shifted_source(shift: Shift, clean_test, *, seed: int, data_dir: str | None):
    """(source, class_subset, label_map) for one shift; the clean test source for corruptions."""
    if shift.corruption is not None:
        from bob_jax.data.corruptions import ShiftedSource

        return ShiftedSource(clean_test, shift.corruption, shift.severity, seed), None, None
    from bob_jax.data.imagenet_ood_classes import OOD_CLASS_LISTS, to_masked_labels, valid_class_indices
    from bob_jax.data.sources import get_source

    source = get_source(shift.dataset, shift.split, data_dir=data_dir)
    base = shift.dataset.split(":")[-1].split("/")[0]
    if base not in OOD_CLASS_LISTS:
        return source, None, None
    subset = valid_class_indices(base)
    # tensorflow-datasets labels ImageNet-A/-R in the 1000-class space; class folders give positions.
    label_map = (lambda y: to_masked_labels(y, subset)) if int(source.num_classes) == 1000 else None
    return source, subset, label_map


def finetune_config(section: ml_collections.ConfigDict, input_size: int):
    """The job's `finetune` section as a `FinetuneConfig`; the job's `input_size` wins when set."""
    from bob_jax.tasks.finetune import FinetuneConfig

    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    values = section.to_dict()
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"config.finetune has unknown field(s) {unknown}; FinetuneConfig accepts {sorted(fields)}")
    if input_size:
        values["input_size"] = int(input_size)
    return FinetuneConfig(**values)


def _num_params(model) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def run(name: str, weights, label: str, tasks, *, config, data, mesh, workdir: pathlib.Path, writer) -> None:
    """Fine-tune one backbone (unless every record it would produce exists) and write its records."""
    from bob_jax.battle import _gflops, input_size_kwargs
    from bob_jax.tasks.finetune import evaluate_model, finetune_model, run_finetune

    ft = finetune_config(config.finetune, config.input_size)
    shifts = [parse_shift(s) for s in config.ood.shifts] if "ood" in tasks else []
    if "ood" in tasks and not shifts:
        raise ValueError("task 'ood' needs config.ood.shifts (e.g. 'gaussian_noise@3' or 'imagenet_a')")
    model = finetune_model(name, weights, data.num_classes, ft, seed=config.seed, **input_size_kwargs(name, config))
    pre = model.preprocess if ft.input_size is None else model.preprocess.replace(input_size=ft.input_size)
    dataset = data.name
    hparams = {"input_size": pre.input_size, "train_source": data.train.describe(),
               "test_source": data.test.describe(), "task": dataclasses.asdict(ft)}
    key = run_key(label, model.weights_id, "finetune", dataset, data.split, config.protocol, config.seed, hparams)
    ood_keys = [
        run_key(label, model.weights_id, "ood", f"{dataset}~{s.name}", data.split, config.protocol, config.seed,
                {**hparams, "shift": s.name, "ood_seed": config.ood.seed, "finetune_key": key})
        for s in shifts
    ]
    todo = [k for k in (key, *ood_keys) if not writer.skip(k, f"{label} / finetune+ood")]
    if not todo:
        return
    common = {"backbone": label, "backbone_name": name, "weights": model.weights_id, "split": data.split,
              "input_size": pre.input_size, "preprocess": pre.to_dict(), "dtype": ft.compute_dtype,
              "num_params": _num_params(model), "gflops": _gflops(name, pre.input_size)}
    t0 = time.time()
    # Checkpoints under runs/<key>: a rerun resumes, and a finished run is restored without training.
    out = run_finetune(model, data.train, data.test, num_classes=data.num_classes, config=ft, mesh=mesh,
                       workdir=str(workdir / "runs" / key), progress=config.progress,
                       sharding_rules=config.sharding_rules)
    clean = {k: out[k] for k in ("top1", "nll", "ece")}
    per_example = out.pop("per_example")
    writer.write({
        **common, "key": key, "task": "finetune", "dataset": dataset, "primary_metric": "top1",
        "metrics": clean, "hparams": hparams, "num_eval": out["num_eval"],
        "train": {"steps": out["steps"], "resumed_from": out["resumed_from"], "losses": out["losses"]},
        "wall_time_s": {"task": time.time() - t0, "train": out["train_seconds"]},
        "metrics_per_example": per_example.tolist(),
    })
    for shift, ood_key in zip(shifts, ood_keys, strict=True):
        t1 = time.time()
        source, subset, label_map = shifted_source(shift, data.test, seed=config.ood.seed,
                                                   data_dir=config.dataset.data_dir or None)
        metrics = evaluate_model(model, source, preprocess=pre, batch_size=ft.eval_batch_size or ft.batch_size,
                                 mesh=mesh, class_subset=subset, label_map=label_map, num_threads=ft.num_threads,
                                 sharding_rules=config.sharding_rules)
        num_eval, per_example = metrics.pop("num_eval"), metrics.pop("per_example")
        # The clean accuracy travels with every shifted result: the OOD drop is read off one record.
        metrics["clean_top1"] = clean["top1"]
        writer.write({
            **common, "key": ood_key, "task": "ood", "dataset": f"{dataset}~{shift.name}", "primary_metric": "top1",
            "metrics": metrics, "num_eval": num_eval,
            "hparams": {**hparams, "shift": shift.name, "ood_seed": config.ood.seed, "finetune_key": key,
                        "ood_source": source.describe()},
            "wall_time_s": {"task": time.time() - t1},
            "metrics_per_example": per_example.tolist(),
        })


def section_defaults(protocol: str) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """The `finetune` and `ood` config sections: BoB's recipe (`bob`) or the CPU recipe (`local`)."""
    from bob_jax.tasks.finetune import FinetuneConfig

    ft = FinetuneConfig.local() if protocol == "local" else FinetuneConfig()
    finetune = ml_collections.ConfigDict(dataclasses.asdict(ft))
    shifts = ("gaussian_noise@3", "gaussian_blur@3", "contrast@3", "rotation@3")
    ood = ml_collections.ConfigDict({"shifts": shifts, "seed": 0})
    return finetune, ood

