"""One EVA-02 (MIM pre-trained or fine-tuned) through the benchmark's tasks.

    python -m bob_jax.main --config=configs/eva02.py --config.weights=none --workdir=runs/eva02  # offline

Args (`:key=value,...`): arch (eva02_small/base/large_patch14_224, eva02_small_patch14_336,
eva02_base/large_patch14_448), tag, weights, dataset, train_size, test_size, input_size (a
multiple of 14; 0 = the tag's own),
task (frozen | linear_probe | knn | retrieval | finetune | ood, `+`-joined; e.g.
`:task=finetune,dataset=cifar100`), protocol.
"""

from bob_jax.config_lib import backbone_config


def get_config(arg=None):
    return backbone_config(arg, arch="eva02_small_patch14_224", tag="mim_in22k", train_size=1000, test_size=500)
