"""One ConvNeXt through the benchmark's tasks; records join the store's ranking.

    python -m bob_jax.main --config=configs/convnext.py --config.weights=none --workdir=runs/convnext  # offline

Args (`:key=value,...`): arch (convnext_tiny | _small | _base | _xlarge), tag (fb_in1k,
fb_in22k, fb_in22k_ft_in1k, vicregl_alpha0p75), weights, dataset, train_size, test_size,
input_size,
task (frozen | linear_probe | knn | retrieval | finetune | ood, `+`-joined; e.g.
`:task=finetune,dataset=cifar100`), protocol.
"""

from bob_jax.config_lib import backbone_config


def get_config(arg=None):
    return backbone_config(arg, arch="convnext_tiny", tag="fb_in1k", train_size=1000, test_size=500)
