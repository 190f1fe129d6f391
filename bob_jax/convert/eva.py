"""timm EVA-02 state dict -> `bob_jax.models.eva.Eva` (near-identity table).

timm's non-persistent buffers (`attn.k_bias`, the rope tables) are not in its state dict; the
model recomputes them. LayerNorm `weight` becomes `scale`, Linear/Conv weights are transposed.
"""

from bob_jax.convert.core import Rule, conv_weight, linear_weight

_LN = r"blocks\.\d+\.(?:norm1|norm2|mlp\.norm)|norm|fc_norm"
_LINEAR = r"blocks\.\d+\.(?:attn\.(?:qkv|q_proj|k_proj|v_proj|proj)|mlp\.(?:fc1|fc1_g|fc1_x|fc2))|head"

TIMM_RULES = (
    Rule(r"(cls_token|pos_embed)", r"\1"),
    Rule(r"patch_embed\.proj\.weight", "patch_embed.proj.kernel", conv_weight),
    Rule(r"patch_embed\.proj\.bias", "patch_embed.proj.bias"),
    Rule(r"(blocks\.\d+\.attn\.(?:q_bias|v_bias))", r"\1"),
    Rule(rf"({_LN})\.weight", r"\1.scale"),
    Rule(rf"({_LN})\.bias", r"\1.bias"),
    Rule(rf"({_LINEAR})\.weight", r"\1.kernel", linear_weight),
    Rule(rf"({_LINEAR})\.bias", r"\1.bias"),
)
