"""One ResNet through the benchmark's tasks; its records join the store's ranking.

    python -m bob_jax.main --config=configs/resnet.py --workdir=runs/battle                # pretrained (hub)
    python -m bob_jax.main --config=configs/resnet.py --config.weights=none --workdir=...  # offline, random init

Args (`:key=value,...`): arch (resnet50 | resnet101), tag (a1_in1k, tv_in1k, dino, vicreg;
resnet101: a1h_in1k, tv_in1k), weights, dataset, train_size, test_size, input_size,
task (frozen | linear_probe | knn | retrieval | finetune | ood, `+`-joined; e.g.
`:task=finetune,dataset=cifar100`), protocol.
Run several into one workdir and `python -m bob_jax.report --workdir=...` ranks them together.
"""

from bob_jax.config_lib import backbone_config


def get_config(arg=None):
    return backbone_config(arg, arch="resnet50", tag="a1_in1k")
