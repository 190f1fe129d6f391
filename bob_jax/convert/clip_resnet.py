"""timm CLIP ResNet (ByobNet `resnet*_clip`) state dict -> `bob_jax.models.clip_resnet.ClipResNet`.

Identity table up to Flax names: every conv sits in a timm `ConvNormAct` (`<m>.conv`, `<m>.bn`);
the attention-pool head keeps `head.q/k/v/proj` and the `[N + 1, C]` `head.pos_embed`. OpenAI's
original `visual.*` layout is renamed by timm's own `_convert_openai_clip` (see the family module).
"""

from bob_jax.convert.core import Rule, conv_weight, linear_weight

_CNA = r"stem\.conv\d|stages\.\d+\.\d+\.(?:conv1_1x1|conv2_kxk|conv3_1x1|shortcut\.conv)"

TIMM_RULES = (
    Rule(r".*\.num_batches_tracked", None),
    Rule(rf"({_CNA})\.conv\.weight", r"\1.conv.kernel", conv_weight),
    Rule(rf"({_CNA})\.bn\.weight", r"\1.bn.scale"),
    Rule(rf"({_CNA})\.bn\.bias", r"\1.bn.bias"),
    Rule(rf"({_CNA})\.bn\.running_mean", r"\1.bn.mean"),
    Rule(rf"({_CNA})\.bn\.running_var", r"\1.bn.var"),
    Rule(r"head\.(q|k|v|proj)\.weight", r"head.\1.kernel", linear_weight),
    Rule(r"head\.(q|k|v|proj)\.bias", r"head.\1.bias"),
    Rule(r"head\.pos_embed", "head.pos_embed"),
)


def is_openai_layout(state_dict) -> bool:
    """OpenAI's CLIP release (`RN50.pt` etc., `model.visual.*` of `clip.load(..., jit=False)`)."""
    return "visual.conv1.weight" in state_dict


def openai_to_timm(state_dict, prefix: str = "visual."):
    """timm `byobnet._convert_openai_clip`: keep the image tower (`visual.*`), rename its
    `conv{i}/bn{i}` stem, `layer{s}.{b}.(conv|bn){i}` and `downsample.{0,1}` keys and the
    `attnpool.{positional_embedding,q_proj,k_proj,v_proj,c_proj}` head to timm's ByobNet names."""
    import re

    ids = {1: "conv1_1x1.", 2: "conv2_kxk.", 3: "conv3_1x1."}

    def stage_sub(m):
        return f"stages.{int(m.group(1)) - 1}.{int(m.group(2))}." + ids[int(m.group(4))] + m.group(3)

    def down_sub(m):
        return f"stages.{int(m.group(1)) - 1}.{int(m.group(2))}.shortcut." + (
            "conv.conv" if int(m.group(3)) == 0 else "conv.bn")

    p = re.escape(prefix)
    out = {}
    for k, v in state_dict.items():
        if not k.startswith(prefix):
            continue
        k = re.sub(rf"{p}conv([0-9])", r"stem.conv\1.conv", k)
        k = re.sub(rf"{p}bn([0-9])", r"stem.conv\1.bn", k)
        k = re.sub(rf"{p}layer([0-9])\.([0-9]+)\.([a-z]+)([0-9])", stage_sub, k)
        k = re.sub(rf"{p}layer([0-9])\.([0-9]+)\.downsample\.([0-9])", down_sub, k)
        if k.startswith(f"{prefix}attnpool"):
            k = k.replace(prefix + "attnpool", "head").replace("positional_embedding", "pos_embed")
            k = k.replace("q_proj", "q").replace("k_proj", "k").replace("v_proj", "v").replace("c_proj", "proj")
        out[k] = v
    return out
