"""One plain ViT (AugReg, DeiT, DINO, MAE, MoCo v3, CLIP towers) through the benchmark's tasks.

    python -m bob_jax.main --config=configs/vit.py --config.weights=none --workdir=runs/vit  # offline
    python -m bob_jax.main --config=configs/vit.py:arch=vit_base_patch16_224,tag=dino --workdir=...

Args (`:key=value,...`): arch, tag, weights, dataset, train_size, test_size, input_size (a
multiple of the patch size; the position embedding is resampled as timm does),
task (frozen | linear_probe | knn | retrieval | finetune | ood, `+`-joined; e.g.
`:task=finetune,dataset=cifar100`), protocol.
"""

from bob_jax.config_lib import backbone_config


def get_config(arg=None):
    return backbone_config(arg, arch="vit_small_patch16_224", tag="augreg_in1k", train_size=1000, test_size=500)
