"""The original's grid: pool backbones x tasks x settings (datasets) x learning rates (bob-spec 3, 4).

    python -m bob_jax.sweep --sweep=configs/sweeps/bob.py --workdir=runs/bob --dry_run
    python -m bob_jax.sweep --sweep=configs/sweeps/bob.py:config_set=consistent --workdir=runs/consistent
    python -m bob_jax.sweep --sweep=configs/sweeps/bob.py:local=true --workdir=runs/bob_local   # offline

Full grid (`local=false`): every pool backbone (`bob_jax.config_sets.POOL`; `pool=` picks a `+`-separated
subset) through
  * fine-tuning (BoB recipe, one lr per run from `lrs`) and the linear probe on ImageNet-1k, CIFAR-100,
    Flowers-102 (validation split, as the original), FGVC-Aircraft (validation split) and EuroSAT
    (the recorded seeded split); fine-tuning on semi-supervised ImageNet 1 % / 10 % and EuroSAT k-shot;
  * OOD: the ImageNet fine-tuned classifier on ImageNet-A/-R (200-class masks), -Sketch and -V2;
  * kNN on ImageNet-1k; retrieval on the datasets the retrieval protocols address.
Datasets are read from tensorflow-datasets / image folders under `data_dir`; those that need a manual
step fail with instructions and the sweep goes on. `config_set` = `bob` (the original's per-task
checkpoints and normalisation) or `consistent` (one checkpoint per backbone, its own preprocessing).

`local=true`: the offline grid on the embedded Fashion-MNIST subset (EfficientNet-Lite0 with real weights,
Lite0 and ResNet-50 at random init; frozen tasks incl. DINOv2's linear eval,
the multi-label probe on the embedded shapes set, fine-tuning with the CPU recipe and OOD on corrupted
test sets), a few minutes on 2 CPU cores.
"""

from bob_jax import config_sets
from bob_jax.data import datasets
from bob_jax.config_lib import battle_config, lock, parse_arg

# Fine-tuning / linear-probe datasets (bob_jax.data.datasets), each evaluated on the split the original
# reported (`DatasetSpec.eval_split`: validation for ImageNet, Flowers-102 and Aircraft, the recorded
# seeded hold-out for EuroSAT, test for CIFAR-100).
CLASSIFICATION = ("imagenet2012", "cifar100", "oxford_flowers102", "fgvc_aircraft", "eurosat")
SEMI_SUPERVISED = ("imagenet2012_subset/1pct", "imagenet2012_subset/10pct")
EUROSAT_SHOTS = (1, 5, 10)
OOD_SHIFTS = ("imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_v2/matched-frequency")
LOCAL_BACKBONES = ("tf_efficientnet_lite0.offline@pretrained", "tf_efficientnet_lite0.offline@random",
                   "resnet50.a1_in1k@random")


def _splits(dataset):
    return "train", datasets.get_spec(dataset).eval_split


def _job(backbones, dataset, splits, tasks, *, data_dir="", normalization="backbone", lr=None, n_shot=0,
         **sizes):
    c = battle_config(backbones=backbones, dataset=dataset, tasks=tasks, **sizes)
    c.dataset.train_split, c.dataset.test_split = splits
    c.dataset.n_shot = float(n_shot)
    c.dataset.data_dir = data_dir
    c.normalization = normalization
    c.progress = False
    if lr is not None:
        c.finetune.lr = lr
    return lock(c)


def _pool(pool, task, config_set):
    return tuple(f"{p}={config_sets.checkpoint(p, task, config_set)}" for p in pool)


def full_grid(a):
    pool = a.pool or tuple(config_sets.POOL)
    runs = []

    def add(task, dataset, tasks, lr=None, n_shot=0):
        name = f"{task}/{dataset}" + (f"/{n_shot}shot" if n_shot else "") + (f"/lr={lr:g}" if lr is not None else "")
        runs.append((name, _job(_pool(pool, task, a.config_set), dataset, _splits(dataset), tasks,
                                data_dir=a.data_dir, normalization=config_sets.normalization(task, a.config_set),
                                lr=lr, n_shot=n_shot)))

    lrs = [float(lr) for lr in a.lrs]
    for dataset in CLASSIFICATION:
        for lr in lrs:
            add("finetune", dataset, ("finetune",), lr=lr)
        add("linear_probe", dataset, ("linear_probe",))
    for dataset in SEMI_SUPERVISED:
        for lr in lrs:
            add("finetune", dataset, ("finetune",), lr=lr)
    for k in EUROSAT_SHOTS:
        for lr in lrs:
            add("finetune", "eurosat", ("finetune",), lr=lr, n_shot=k)
    add("knn", "imagenet2012", ("knn",))
    for lr in lrs:
        add("ood", "imagenet2012", ("finetune", "ood"), lr=lr)
    for _, config in runs:
        if "ood" in config.tasks:
            config.ood.shifts = OOD_SHIFTS
    return runs


def local_grid(a):
    sizes = dict(train_size=2000, test_size=1000, input_size=112)
    splits = ("train", "test")
    return [
        ("frozen/fashion_mnist", _job(LOCAL_BACKBONES, "fashion_mnist", splits,
                                      ("linear_probe", "linear_multihead", "knn", "retrieval"), **sizes)),
        ("multilabel/shapes", _job(LOCAL_BACKBONES, "shapes", splits, ("multilabel_probe",), train_size=0,
                                   test_size=0, input_size=64)),
        *[(f"ood/fashion_mnist/lr={float(lr):g}",
           _job(LOCAL_BACKBONES, "fashion_mnist", splits, ("finetune", "ood"), lr=float(lr), **sizes))
          for lr in a.lrs],
    ]


def get_sweep(arg=None):
    a = parse_arg(arg, local=False, config_set="bob", pool=(), lrs=("1e-3",), data_dir="")
    if a.config_set not in config_sets.CONFIG_SETS:
        raise ValueError(f"config_set={a.config_set!r}: choose one of {config_sets.CONFIG_SETS}")
    return local_grid(a) if a.local else full_grid(a)
