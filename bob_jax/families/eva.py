"""EVA-02 (timm `eva.py`, `eva02_*_patch14_*`): model, timm random init, key table and tags.

Preprocessing from each tag's timm pretrained_cfg: OpenAI CLIP mean/std, bicubic; the MIM
checkpoints (no head) use crop 0.9 at 224, the fine-tuned ones crop 1.0 at 336/448.
"""


from bob_jax.backbones.family import Family
from bob_jax.backbones.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
from bob_jax.backbones.zoo_types import HubWeights, ZooEntry
from bob_jax.convert import eva as convert
from bob_jax.families import vit as vit_family
from bob_jax.models import eva

_CLIP = dict(interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD)
_MIM = Preprocess(224, 0.9, **_CLIP)
# timm's pretrained_cfg for the 448 fine-tunes resizes both sides (crop_mode='squash').
_SQUASH448 = Preprocess(448, 1.0, crop_mode="squash", **_CLIP)


def _mim(arch: str, tag: str, notes: str = "") -> ZooEntry:
    notes = ("MIM pre-trained encoder, no head; timm moves the MIM norm to fc_norm. " + notes).strip()
    return ZooEntry(arch, tag, _MIM, HubWeights(f"timm/{arch}.{tag}"), num_classes=0, license="mit",
                    notes=notes)


def num_layers(cfg) -> int:
    """timm's Eva group_matcher (ViT's): the embeddings, one group per block, then `fc_norm` (avg pool)
    / `head` (no group when neither exists)."""
    return cfg.depth + 1 + (cfg.global_pool == "avg" or cfg.num_classes > 0)


# Parameter paths share ViT's names (no reg_token / norm_pre here), so ViT's ids apply unchanged.
layer_id = vit_family.layer_id


FAMILY = Family(
    name="eva",
    archs=eva.ARCHS,
    arch_kwargs=eva.ARCH_KWARGS,
    model=eva.Eva,
    init_rules=eva.init_rules,
    timm_rules=convert.TIMM_RULES,
    head_prefixes=("head.",),
    layer_id=layer_id,
    num_layers=num_layers,
    entries=(
        _mim("eva02_small_patch14_224", "mim_in22k"),
        _mim("eva02_base_patch14_224", "mim_in22k"),
        _mim("eva02_large_patch14_224", "mim_in22k"),
        _mim("eva02_large_patch14_224", "mim_m38m", "Merged-38M pre-training data."),
        ZooEntry("eva02_small_patch14_336", "mim_in22k_ft_in1k", Preprocess(336, 1.0, **_CLIP),
                 HubWeights("timm/eva02_small_patch14_336.mim_in22k_ft_in1k"), license="mit"),
        ZooEntry("eva02_base_patch14_448", "mim_in22k_ft_in22k_in1k", _SQUASH448,
                 HubWeights("timm/eva02_base_patch14_448.mim_in22k_ft_in22k_in1k"), license="mit"),
        ZooEntry("eva02_large_patch14_448", "mim_in22k_ft_in22k_in1k", _SQUASH448,
                 HubWeights("timm/eva02_large_patch14_448.mim_in22k_ft_in22k_in1k"), license="mit"),
    ),
)
