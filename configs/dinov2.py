"""One DINOv2 (with or without registers) through the benchmark's tasks.

    python -m bob_jax.main --config=configs/dinov2.py --config.weights=none --workdir=runs/dinov2  # offline
    python -m bob_jax.main --config=configs/dinov2.py:arch=vit_base_patch14_reg4_dinov2,input_size=224 --workdir=...

DINOv2 is trained at 518 px; other input sizes (multiples of 14) resample the position embedding
from the native 37x37 grid exactly as timm's checkpoint filter does. Args: arch, tag, weights,
dataset, train_size, test_size, input_size,
task (frozen | linear_probe | knn | retrieval | finetune | ood, `+`-joined; e.g.
`:task=finetune,dataset=cifar100`), protocol.
"""

from bob_jax.config_lib import backbone_config


def get_config(arg=None):
    return backbone_config(arg, arch="vit_small_patch14_dinov2", tag="lvd142m", train_size=1000, test_size=500)
