"""Task config: fine-tuning, then the fine-tuned classifier on shifted test sets
(`config.ood.shifts`: seeded corruptions of the test split offline; imagenet_a, imagenet_r,
imagenet_sketch, imagenet_v2 or an image-folder tree such as VisDA-2017 real).

    python -m bob_jax.main --config=configs/tasks/ood.py --workdir=runs/ood   # offline default
    python -m bob_jax.main --workdir=runs/ood_cifar100 \
        --config=configs/tasks/ood.py:backbones=resnet50.a1_in1k+convnext_tiny.fb_in1k,dataset=cifar100,\
train_size=0,test_size=0,input_size=0

Any backbone config combines with the same task: `--config=configs/swin.py:task=ood`.
Args: backbones (`+`-separated `[label=]name@weights`), dataset, train_size, test_size,
input_size, protocol.
"""

from bob_jax.config_lib import task_config

OFFLINE = ("tf_efficientnet_lite0.offline@pretrained", "tf_efficientnet_lite0.offline@random")


def get_config(arg=None):
    return task_config(arg, task="ood", backbones=OFFLINE)
