"""Config helpers: the typed `get_config(arg)` string parser and locking.

Shared fragments (the frozen-feature battle, the original's linear-probe recipe) live here, inside
the package, so a config file works from any directory. Config files are Python modules with `get_config(arg: str | None) -> ConfigDict`; `arg` is a
comma-separated `key=value` string whose keys and types are declared by the config file
(big_vision's convention): `--config=configs/resnet.py:weights=random,input_size=128`.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from bob_jax import trained


def _cast(key: str, value: str, default: Any) -> Any:
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config arg {key}={value!r}: expected a boolean")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    if isinstance(default, tuple):
        return tuple(v for v in value.split("+") if v)
    return value


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
    """Parse `"k=v,k2=v2"` against `spec` (key -> default, whose type is the value's type).

    Tuples are written with `+` separators (`backbones=a.x+b.y`). An unknown key is an error that
    names it and lists the accepted ones.
    """
    out = dict(spec)
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config arg {item!r} is not key=value")
        if key not in spec:
            raise ValueError(f"unknown config arg {key!r}; accepted: {sorted(spec)}")
        out[key] = _cast(key, value, spec[key])
    return ml_collections.ConfigDict(out)


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Lock a config so that a mistyped or unknown key is an error naming the key."""
    config.lock()
    return config



def linear_probe_config(epochs: int = 90, warmup_epochs: int = 10, batch_size: int = 256) -> ml_collections.ConfigDict:
    """The original (MAE) linear-probe recipe: non-affine BN + linear head, LARS, base lr 0.1 scaled
    by batch/256, weight decay 0, warmup then half-cosine (bob-spec.md section 3.2)."""
    return ml_collections.ConfigDict(
        dict(
            epochs=epochs,
            warmup_epochs=warmup_epochs,
            batch_size=batch_size,
            base_lr=0.1,
            weight_decay=0.0,
            momentum=0.9,
            use_bn=True,
            seed=0,
            log_every_steps=50,
            # Checkpoint (head, optimizer, data iterator) every N steps; resumed after a kill.
            checkpoint_every_steps=200,
        )
    )


def linear_multihead_config(protocol: str = "bob") -> ml_collections.ConfigDict:
    """DINOv2's linear evaluation (bob_jax.tasks.linear_multihead): 13 base lrs x batch / 256, n last class
    tokens in {1, 4} with/without avgpool, SGD momentum 0.9, cosine over epochs x epoch_length iterations,
    global batch 1024; chosen on a seeded, stratified held-out 10 % of train. Protocols other than "bob"
    (reduced CPU runs) train 10 x 100 iterations at batch 128."""
    full = protocol == "bob"
    return ml_collections.ConfigDict(dict(
        base_lrs=(1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1),
        n_last_blocks=(1, 4), avgpool=(False, True), epochs=10, epoch_length=1250 if full else 100,
        batch_size=1024 if full else 128, momentum=0.9, init_std=0.01, val_fraction=0.1, seed=0,
    ))


def multilabel_probe_config() -> ml_collections.ConfigDict:
    """Multi-label linear probe (bob_jax.tasks.multilabel_probe): sigmoid BCE, AdamW with BoB's CheXpert
    values (lr 1e-3, wd 1e-3, cosine to 1e-5 after warm-up), standardised features, mean AUROC."""
    return ml_collections.ConfigDict(dict(
        epochs=50, warmup_epochs=5, batch_size=256, lr=1e-3, min_lr=1e-5, weight_decay=1e-3, standardize=True,
        init_std=0.01, seed=0,
    ))


def retrieval_config() -> ml_collections.ConfigDict:
    """Training-free retrieval (bob-spec 3.6). protocol: "split" (test queries, train database, same class =
    positive), "class_folder" (one class-folder test source: per class the first int(query_fraction * n)
    sorted file names are queries, the rest the database; max_per_class > 0 caps each class first, as the
    original for INSTRE / ObjectNet (50) and iNat (5)) or "revisited" (dataset revisited:<name>, mAP and
    mP@k per difficulty, Medium ranked). descriptor: "bob" (the original's per-family choice, e.g. CLIP
    ResNets' projected embedding) or "pooled"."""
    return ml_collections.ConfigDict(
        dict(ks=(1, 5, 10), protocol="split", descriptor="bob", query_fraction=0.2, max_per_class=0)
    )


def battle_config(
    *,
    backbones,
    dataset="fashion_mnist",
    train_size=0,
    test_size=0,
    input_size=0,
    tasks=("linear_probe", "knn", "retrieval"),
    protocol=None,
) -> ml_collections.ConfigDict:
    """A frozen-feature battle. `input_size=0` keeps each backbone's pretrained input size;
    `train_size`/`test_size` 0 use whole splits. `protocol` is recorded with every result and the
    report never ranks different protocols together; by default it is "bob" for full splits at the
    backbones' own input sizes and "local" when data or input size are reduced."""
    if protocol is None:
        protocol = "local" if (train_size or test_size or input_size) else "bob"
    c = ml_collections.ConfigDict()
    c.job = "battle"
    c.backbones = tuple(backbones)
    # Overrides every entry's weights: "pretrained", "random"/"none" (random init) or a path.
    c.weights = ""
    c.tasks = tuple(tasks)
    c.protocol = protocol
    c.seed = 0
    c.input_size = input_size
    c.normalization = "backbone"  # or "imagenet": the original linear probe's fixed ImageNet stats
    c.batch_size = 64
    c.num_workers = 0
    # Device mesh, "axis=size,...": "data" (data parallel) and/or "fsdp" (parameters and optimiser state
    # sharded, the batch split over both), one size may be -1; empty: every device on "data". E.g.
    # --config.mesh=fsdp=-1 or --config.mesh=data=2,fsdp=4 (bob_jax.parallel).
    c.mesh = ""
    # Parameter sharding of the trained tasks (finetune, ood): "regex=spec" strings, first full match of
    # the dotted parameter path wins, unmatched parameters replicated. spec: "fsdp" (largest dimension
    # divisible by the fsdp axis; small arrays replicated), "replicate", or one entry per dimension
    # ("fsdp,None", "None,data+fsdp"). Empty: every parameter "fsdp" (replicated without an fsdp axis).
    # E.g. --config.sharding_rules="('.*[.]kernel=fsdp', '.*=replicate')" (the tuple is a Python literal:
    # write "[.]" rather than "\." for a literal dot).
    c.sharding_rules = ()
    c.progress = True
    c.force = False
    c.dataset = ml_collections.ConfigDict(
        dict(
            name=dataset,
            train_split="train",
            test_split="test",
            train_size=train_size,
            test_size=test_size,
            seed=0,
            data_dir="",
            # Few-shot / semi-supervised training subset of a benchmark dataset (bob_jax.data.datasets):
            # k examples per class (>= 1) or a fraction (< 1) as the original's --n_shot; 0: all.
            n_shot=0.0,
        )
    )
    c.linear_probe = linear_probe_config()
    c.knn = ml_collections.ConfigDict(dict(k=20, temperature=0.07, extra_ks=(10, 100)))
    c.retrieval = retrieval_config()
    c.linear_multihead = linear_multihead_config(protocol)
    c.multilabel_probe = multilabel_probe_config()
    c.finetune, c.ood = trained.section_defaults(protocol)
    return c


# Task configs: a name any backbone config combines with (`:task=finetune`) -> the job's task list.
# `ood` fine-tunes and evaluates the fine-tuned classifier on shifted test sets (`config.ood.shifts`).
TASK_PRESETS = {
    "frozen": ("linear_probe", "knn", "retrieval"),
    "linear_probe": ("linear_probe",),
    "knn": ("knn",),
    "retrieval": ("retrieval",),
    "finetune": ("finetune",),
    "ood": ("finetune", "ood"),
}


def expand_tasks(task: str | tuple[str, ...]) -> tuple[str, ...]:
    """`"finetune+knn"` or a tuple of names -> the job's task names (presets expanded, order kept)."""
    names = task.split("+") if isinstance(task, str) else task
    out: list[str] = []
    for name in (n.strip() for n in names if n.strip()):
        out.extend(t for t in TASK_PRESETS.get(name, (name,)) if t not in out)
    return tuple(out)


def backbone_config(
    arg: str | None,
    *,
    arch: str,
    tag: str,
    train_size: int = 2000,
    test_size: int = 1000,
    input_size: int = 112,
) -> ml_collections.ConfigDict:
    """One family's config file: one backbone (`arch.tag`) through the tasks of the benchmark.

    Declared args: arch, tag, weights (pretrained | random | none | path), task (a task config:
    frozen (default) | linear_probe | knn | retrieval | finetune | ood, or any task name, `+`-joined),
    dataset, train_size, test_size, input_size (0 = the tag's own), protocol (default: `local` for
    reduced data or input size, else `bob`). The defaults run offline on the embedded Fashion-MNIST
    subset with `--config.weights=none`.
    """
    a = parse_arg(
        arg, arch=arch, tag=tag, weights="pretrained", task="frozen", dataset="fashion_mnist",
        train_size=train_size, test_size=test_size, input_size=input_size, protocol="",
    )
    config = battle_config(
        backbones=(f"{a.arch}.{a.tag}@{a.weights}",), dataset=a.dataset, train_size=a.train_size,
        test_size=a.test_size, input_size=a.input_size, tasks=expand_tasks(a.task), protocol=a.protocol or None,
    )
    return lock(config)


def task_config(arg: str | None, *, task: str, backbones: tuple[str, ...], **defaults) -> ml_collections.ConfigDict:
    """A task config file (`configs/tasks/<task>.py`): the task over a list of backbones.

    Declared args: backbones (`+`-separated `[label=]name@weights`), dataset, train_size, test_size,
    input_size, protocol; `defaults` override their defaults (the offline Fashion-MNIST subset)."""
    spec = dict(backbones=backbones, dataset="fashion_mnist", train_size=2000, test_size=1000, input_size=112,
                protocol="")
    spec.update(defaults)
    a = parse_arg(arg, **spec)
    config = battle_config(
        backbones=a.backbones, dataset=a.dataset, train_size=a.train_size, test_size=a.test_size,
        input_size=a.input_size, tasks=expand_tasks(task), protocol=a.protocol or None,
    )
    return lock(config)
