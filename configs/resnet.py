"""One ResNet through the frozen-feature tasks; its records join the store's ranking.

    python -m bob_jax.main --config=configs/resnet.py:tag=a1_in1k,weights=random --workdir=runs/battle

Args: arch (resnet50 | resnet101), tag (a1_in1k, tv_in1k; resnet101: a1h_in1k, tv_in1k), weights
(pretrained | random | /path/to/checkpoint), dataset, train_size, test_size, input_size (0 = the
tag's own), tasks (`+`-separated). Pretrained weights come from the Hugging Face hub (timm/<arch>.<tag>)
or a local file. Run several into one workdir and `python -m bob_jax.report` ranks them together.
"""

from bob_jax.config_lib import battle_config, lock, parse_arg


def get_config(arg=None):
    arg = parse_arg(
        arg, arch="resnet50", tag="a1_in1k", weights="pretrained", dataset="fashion_mnist",
        train_size=2000, test_size=1000, input_size=112, tasks=("linear_probe", "knn", "retrieval"),
    )
    return lock(battle_config(
        backbones=(f"{arg.arch}.{arg.tag}@{arg.weights}",), dataset=arg.dataset, train_size=arg.train_size,
        test_size=arg.test_size, input_size=arg.input_size, tasks=arg.tasks,
    ))
