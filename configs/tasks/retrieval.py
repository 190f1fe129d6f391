"""Task config: training-free retrieval (L2-normalised descriptors; `--config.retrieval.protocol`
split | class_folder | revisited).

    python -m bob_jax.main --config=configs/tasks/retrieval.py --workdir=runs/retrieval   # offline default
    python -m bob_jax.main --workdir=runs/retrieval_cifar100 \
        --config=configs/tasks/retrieval.py:backbones=resnet50.a1_in1k+convnext_tiny.fb_in1k,dataset=cifar100,\
train_size=0,test_size=0,input_size=0

Any backbone config combines with the same task: `--config=configs/swin.py:task=retrieval`.
Args: backbones (`+`-separated `[label=]name@weights`), dataset, train_size, test_size,
input_size, protocol.
"""

from bob_jax.config_lib import task_config

OFFLINE = ("tf_efficientnet_lite0.offline@pretrained", "tf_efficientnet_lite0.offline@random")


def get_config(arg=None):
    return task_config(arg, task="retrieval", backbones=OFFLINE)
