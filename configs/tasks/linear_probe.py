"""Task config: the original's linear probe on frozen features (MAE recipe: non-affine BN +
linear head, LARS, 90 epochs).

    python -m bob_jax.main --config=configs/tasks/linear_probe.py --workdir=runs/linear_probe   # offline default
    python -m bob_jax.main --workdir=runs/linear_probe_cifar100 \
        --config=configs/tasks/linear_probe.py:backbones=resnet50.a1_in1k+convnext_tiny.fb_in1k,dataset=cifar100,\
train_size=0,test_size=0,input_size=0

Any backbone config combines with the same task: `--config=configs/swin.py:task=linear_probe`.
Args: backbones (`+`-separated `[label=]name@weights`), dataset, train_size, test_size,
input_size, protocol.
"""

from bob_jax.config_lib import task_config

OFFLINE = ("tf_efficientnet_lite0.offline@pretrained", "tf_efficientnet_lite0.offline@random")


def get_config(arg=None):
    return task_config(arg, task="linear_probe", backbones=OFFLINE)
