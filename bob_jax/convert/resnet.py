"""timm / torchvision ResNet state dict -> `bob_jax.models.resnet.ResNet` (near-identity table)."""

from bob_jax.convert.core import Rule, conv_weight, linear_weight

_CONV = r"conv1|layer\d\.\d+\.(?:conv\d|downsample\.0)"
_BN = r"bn1|layer\d\.\d+\.(?:bn\d|downsample\.1)"

TIMM_RULES = (
    Rule(r".*\.num_batches_tracked", None),
    Rule(rf"({_CONV})\.weight", r"\1.kernel", conv_weight),
    Rule(rf"({_BN})\.weight", r"\1.scale"),
    Rule(rf"({_BN})\.bias", r"\1.bias"),
    Rule(rf"({_BN})\.running_mean", r"\1.mean"),
    Rule(rf"({_BN})\.running_var", r"\1.var"),
    Rule(r"fc\.weight", "fc.kernel", linear_weight),
    Rule(r"fc\.bias", "fc.bias"),
)
