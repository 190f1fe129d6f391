"""One Swin / SwinV2 backbone through the benchmark's tasks; records join the store's ranking.

    python -m bob_jax.main --config=configs/swin.py --config.weights=none --workdir=runs/swin  # offline
    python -m bob_jax.main --config=configs/swin.py:arch=swinv2_tiny_window8_256,tag=ms_in1k --workdir=...

Args (`:key=value,...`): arch, tag (see `bob_jax.backbones.list_backbones()`: swin_*, swinv2_*,
MiDaS v3.1 `swinv2_*.midas_v31`), weights, dataset, train_size, test_size, input_size (0 = the
tag's own; other sizes build the model at that img_size, with pretrained tables resized as timm
does),
task (frozen | linear_probe | knn | retrieval | finetune | ood, `+`-joined; e.g.
`:task=finetune,dataset=cifar100`), protocol.
"""

from bob_jax.config_lib import backbone_config


def get_config(arg=None):
    return backbone_config(arg, arch="swin_tiny_patch4_window7_224", tag="ms_in1k", train_size=1000,
                           test_size=500)
