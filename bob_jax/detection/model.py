"""Mask R-CNN / Cascade (Mask) R-CNN on any zoo backbone: trunk + neck + RPN + RoI heads.

`Detector(DetectorConfig(...))` assembles
- the trunk: hierarchical backbones (ResNet, ConvNeXt, Swin/SwinV2, EfficientNet, CLIP ResNet) from
  `bob_jax.backbones.create(name, weights=..., num_classes=0, drop_path_rate=...)`, whose `features`
  maps at strides 4..32 feed an `FPN`; plain ViTs (DeiT/augreg, DINO, MoCo v3, MAE, CLIP, DINOv2) are
  created the same way and adapted with `ViTDetBackbone.from_vit` (window attention, global blocks,
  relative positions, patch 16) and feed a `SimpleFeaturePyramid` of the chosen variant ("vitdet":
  detectron2's; "bob": the original's pyramid + FPN_VITDET neck). EVA-02 gets EVA-02's own ViTDet trunk
  (`eva02det.Eva02DetBackbone.from_eva`: RoPE, SwiGLU, p14to16) with the same pyramids.
- the RPN (`rpn.RPN`: one 3x3 conv for FPN, two for the ViTDet recipe, as detectron2's configs);
- the RoI heads (`roi_heads.StandardROIHeads` for "mask_rcnn", `CascadeROIHeads` for
  "cascade_mask_rcnn" and the box-only "cascade_rcnn" of the OOD-detection protocol).

Inputs are uint8 NHWC images zero-padded to a square `image_size` with `image_sizes` [B, 2] (h, w) of the
valid region (the `bob_jax.detection.data` transforms' output). They are normalised on the device with the
backbone's own preprocess mean/std, and the padded area is zeroed again afterwards (detectron2 pads the
normalised image with zeros; the data pipeline pads uint8 zeros, which normalise to -mean/std).

`losses(images, image_sizes, targets, key)` returns the RPN and RoI losses (drop-path masks, anchor and RoI
sampling drawn from `key`); `detect(images, image_sizes)` returns fixed-size detections with a `valid` mask
and, with a mask head, 28x28 mask probabilities of the detected class. Train / eval behaviour follows the
module's mode: `set_train_mode(model, bn_train=...)` turns on stochastic depth (and, optionally, batch
statistics in the trunk's BatchNorms), `model.eval()` turns both off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from bob_jax.backbones.preprocess import Preprocess, normalize
from bob_jax.detection.anchors import AnchorGenerator
from bob_jax.detection.necks import FPN, SimpleFeaturePyramid
from bob_jax.detection.roi_heads import CascadeROIHeads, RoIHeadsConfig, StandardROIHeads, cascade_config
from bob_jax.detection.rpn import RPN, RPNConfig

HEADS = ("mask_rcnn", "cascade_mask_rcnn", "cascade_rcnn")
NECKS = ("vitdet", "bob")
CASCADE_STYLES = ("detectron2", "mmdet")
FPN_STRIDES = (4, 8, 16, 32)
TRUNK = "trunk"  # attribute name of the trunk: the frozen protocol's parameter filter keys on it


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Everything that defines a detector. Defaults: detectron2's COCO Mask R-CNN at 1024 px (ViTDet
    recipe for plain ViTs), 80 classes.

    weights: "pretrained", None (random init in the source framework's scheme, seeded by `seed`) or a
    checkpoint path, as `backbones.create`. `neck` applies to plain ViTs only (hierarchical backbones
    always use an FPN). (train, test) pairs for the RPN's top-k counts. `max_candidates` bounds the
    per-image (RoI, class) candidates entering the final NMS (exact while fewer pass the 0.05 score
    threshold; None = all). `cascade_style` "mmdet" uses the original's (BoB) stage weighting:
    loss weights (1, 0.5, 0.25), no feature-gradient scaling, RoIs re-sampled per stage.
    """

    backbone: str = "vit_base_patch16_224.mae"
    weights: str | None = "pretrained"
    head: str = "mask_rcnn"
    neck: str = "vitdet"
    num_classes: int = 80
    image_size: int = 1024
    drop_path_rate: float = 0.1
    seed: int = 0
    # neck and heads
    neck_channels: int = 256
    head_norm: str | None = "LN"
    rpn_convs: int | None = None  # None: 1 with an FPN, 2 with a ViT pyramid (detectron2's configs)
    box_head_convs: int = 4
    box_head_conv_dim: int = 256
    box_head_fcs: int = 1
    box_head_fc_dim: int = 1024
    mask_head_convs: int = 4
    mask_head_conv_dim: int = 256
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    # RPN
    rpn_batch_size_per_image: int = 256
    rpn_pre_nms_topk: tuple[int, int] = (2000, 1000)
    rpn_post_nms_topk: tuple[int, int] = (1000, 1000)
    # RoI heads
    roi_batch_size_per_image: int = 512
    roi_positive_fraction: float = 0.25
    box_loss: str = "smooth_l1"
    box_loss_weight: float = 1.0
    cascade_style: str = "detectron2"
    detections_per_image: int = 100
    max_candidates: int | None = 4096
    # ViTDet trunk
    window_size: int = 14
    patch_resize: str = "bicubic"

    def __post_init__(self):
        for name in ("rpn_pre_nms_topk", "rpn_post_nms_topk", "anchor_sizes"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.head not in HEADS:
            raise ValueError(f"head={self.head!r} is not supported; use one of {HEADS}")
        if self.neck not in NECKS:
            raise ValueError(f"neck={self.neck!r} is not supported; use one of {NECKS} (plain ViTs only)")
        if self.cascade_style not in CASCADE_STYLES:
            raise ValueError(f"cascade_style={self.cascade_style!r}: use one of {CASCADE_STYLES}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 foreground classes, got {self.num_classes}")
        if self.image_size <= 0 or self.image_size % 32:
            raise ValueError(
                f"image_size={self.image_size} must be a positive multiple of 32 (the FPN's coarsest "
                "stride; p6 halves it again), e.g. 128, 512 or 1024"
            )
        if len(self.anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per level p2..p6 (5), got {self.anchor_sizes}")
        if len(self.rpn_pre_nms_topk) != 2 or len(self.rpn_post_nms_topk) != 2:
            raise ValueError("rpn_pre_nms_topk and rpn_post_nms_topk are (train, test) pairs")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must lie in [0, 1), got {self.drop_path_rate}")

    @property
    def mask_on(self) -> bool:
        return self.head != "cascade_rcnn"

    @property
    def cascade(self) -> bool:
        return self.head.startswith("cascade")

    def roi_heads_config(self) -> RoIHeadsConfig:
        settings = {
            "num_convs": self.box_head_convs,
            "conv_dim": self.box_head_conv_dim,
            "fc_dims": (self.box_head_fc_dim,) * self.box_head_fcs,
            "norm": self.head_norm,
            "batch_size_per_image": self.roi_batch_size_per_image,
            "positive_fraction": self.roi_positive_fraction,
            "box_loss": self.box_loss,
            "box_loss_weight": self.box_loss_weight,
            "mask_on": self.mask_on,
            "mask_num_convs": self.mask_head_convs,
            "mask_conv_dim": self.mask_head_conv_dim,
            "detections_per_image": self.detections_per_image,
            "max_candidates": self.max_candidates,
        }
        if not self.cascade:
            return RoIHeadsConfig(num_classes=self.num_classes, **settings)
        if self.cascade_style == "mmdet":
            settings.update(stage_loss_weights=(1.0, 0.5, 0.25), scale_feature_grad=False,
                            cascade_sampling="resample")
        return cascade_config(self.num_classes, **settings)

    def rpn_config(self, plain_vit: bool) -> RPNConfig:
        convs = self.rpn_convs if self.rpn_convs is not None else (2 if plain_vit else 1)
        return RPNConfig(
            conv_dims=(-1,) * convs,
            anchor_generator=AnchorGenerator(sizes=tuple((s,) for s in self.anchor_sizes)),
            batch_size_per_image=self.rpn_batch_size_per_image,
            pre_nms_topk=self.rpn_pre_nms_topk,
            post_nms_topk=self.rpn_post_nms_topk,
        )


def is_plain_vit(model: nnx.Module) -> bool:
    """A zoo ViT (ViT, DINOv2, CLIP, ...) or EVA-02: a single stride-p map for the simple pyramid."""
    from bob_jax.models import eva as eva_lib
    from bob_jax.models import vit as vit_lib

    return isinstance(model, (vit_lib.VisionTransformer, eva_lib.Eva))


def _create_trunk(cfg: DetectorConfig) -> tuple[nnx.Module, bool]:
    """(trunk, plain_vit): the zoo backbone without head; plain ViTs adapted to ViTDet."""
    from bob_jax import backbones
    from bob_jax.detection.eva02det import Eva02DetBackbone
    from bob_jax.detection.vitdet import ViTDetBackbone, default_global_blocks

    arch = cfg.backbone.partition(".")[0]
    family = backbones.zoo.ARCH_TO_FAMILY.get(arch)
    if family is None:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; choose one of backbones.list_backbones()")
    plain = family.name in ("vit", "eva")
    kwargs = {"num_classes": 0}
    if not plain:
        if cfg.drop_path_rate and "drop_path_rate" not in family.arch_kwargs:
            raise ValueError(f"{cfg.backbone} has no stochastic depth; set drop_path_rate=0")
        if "drop_path_rate" in family.arch_kwargs:
            kwargs["drop_path_rate"] = cfg.drop_path_rate
        if "img_size" in family.arch_kwargs:  # window / token models are built for their input size
            kwargs["img_size"] = cfg.image_size
    model = backbones.create(cfg.backbone, weights=cfg.weights, seed=cfg.seed, **kwargs)
    if not plain:
        return model, False
    if family.name == "eva":  # EVA-02's trunk; the neck variant picks the global blocks as for ViTs
        trunk = Eva02DetBackbone.from_eva(
            model, img_size=cfg.image_size, window_size=cfg.window_size,
            global_blocks=default_global_blocks(cfg.neck, model.cfg.depth), drop_path_rate=cfg.drop_path_rate,
            patch_resize=cfg.patch_resize,
        )
    else:
        trunk = ViTDetBackbone.from_vit(
            model, img_size=cfg.image_size, window_size=cfg.window_size, variant=cfg.neck,
            drop_path_rate=cfg.drop_path_rate, patch_resize=cfg.patch_resize,
        )
    trunk.name, trunk.preprocess, trunk.weights_id = model.name, model.preprocess, model.weights_id
    return trunk, True


def pad_mask(image_sizes: jax.Array, height: int, width: int) -> jax.Array:
    """[B, H, W] True inside each image's valid (h, w) region."""
    rows = jnp.arange(height)[None, :, None] < image_sizes[:, 0, None, None]
    cols = jnp.arange(width)[None, None, :] < image_sizes[:, 1, None, None]
    return rows & cols


class Detector(nnx.Module):
    """Trunk + neck + RPN + RoI heads (see the module docstring). Attributes: `trunk`, `neck`, `rpn`,
    `roi_heads`, plus `config`, `preprocess` (the backbone's), `plain_vit`, `name`, `weights_id`."""

    def __init__(self, config: DetectorConfig):
        self.config = config
        trunk, self.plain_vit = _create_trunk(config)
        self.name, self.weights_id = trunk.name, trunk.weights_id
        self.preprocess: Preprocess = trunk.preprocess
        rngs = nnx.Rngs(config.seed)
        if self.plain_vit:
            stride = trunk.cfg.patch_size
            neck = SimpleFeaturePyramid(trunk.num_features, config.neck_channels, variant=config.neck,
                                        in_stride=stride, rngs=rngs)
        else:
            info = trunk.feature_info
            missing = [s for s in FPN_STRIDES if s not in info]
            if missing:
                raise ValueError(f"{config.backbone} has no feature maps at strides {missing} (has "
                                 f"{sorted(info)}); the FPN needs strides {FPN_STRIDES}")
            neck = FPN({s: info[s] for s in FPN_STRIDES}, config.neck_channels, rngs=rngs)
        setattr(self, TRUNK, trunk)
        self.neck = neck
        self.rpn = RPN(config.neck_channels, config.rpn_config(self.plain_vit), rngs=rngs)
        heads = CascadeROIHeads if config.cascade else StandardROIHeads
        self.roi_heads = heads(config.neck_channels, config.roi_heads_config(), rngs=rngs)

    # ---------------------------------------------------------------------------------------------

    def normalize(self, images, image_sizes) -> jax.Array:
        """uint8 [B, S, S, 3] -> float32 normalised with the backbone's mean/std, padding zeroed."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be NHWC [B, S, S, 3], got {images.shape}")
        x = normalize(images, self.preprocess)
        return jnp.where(pad_mask(image_sizes, x.shape[1], x.shape[2])[..., None], x, 0.0)

    def features(self, images, image_sizes, key=None) -> dict[str, jax.Array]:
        """Pyramid maps {"p2".."p6"}; `key` drives stochastic depth when the trunk is in train mode."""
        from bob_jax.models.layers import uses_drop_path

        x = self.normalize(images, image_sizes)
        trunk = getattr(self, TRUNK)
        kwargs = {"rngs": nnx.Rngs(dropout=key)} if key is not None and uses_drop_path(trunk) else {}
        return self.neck(trunk(x, **kwargs)["features"])

    def losses(self, images, image_sizes, targets: Mapping[str, jax.Array], key) -> dict[str, jax.Array]:
        """Training losses: {"loss_rpn_cls", "loss_rpn_loc", "loss_cls"/"loss_box_reg" (cascade: per stage),
        "loss_mask" (with masks)}. targets: "gt_boxes" [B, G, 4], "gt_classes" [B, G] (-1 padding),
        "gt_masks" [B, G, S, S] (mask heads)."""
        image_sizes = jnp.asarray(image_sizes, jnp.int32)
        k_drop, k_rpn, k_roi = jax.random.split(key, 3)
        features = self.features(images, image_sizes, k_drop)
        proposals, losses = self.rpn(
            features, image_sizes, training=True, gt_boxes=targets["gt_boxes"],
            gt_valid=targets["gt_classes"] >= 0, key=k_rpn,
        )
        roi_losses = self.roi_heads(features, proposals["boxes"], proposals["valid"], image_sizes, targets,
                                    key=k_roi, train=True)
        return {**losses, **roi_losses}

    def detect(self, images, image_sizes) -> dict[str, jax.Array]:
        """Detections per image: "boxes" [B, D, 4] (input pixels), "scores", "classes" (-1 padding),
        "valid" [B, D], and with masks "masks" [B, D, 28, 28] probabilities."""
        image_sizes = jnp.asarray(image_sizes, jnp.int32)
        features = self.features(images, image_sizes)
        proposals, _ = self.rpn(features, image_sizes, training=False)
        return self.roi_heads(features, proposals["boxes"], proposals["valid"], image_sizes, train=False)


def set_train_mode(model: Detector, *, bn_train: bool = False) -> Detector:
    """Training mode: stochastic depth on; BatchNorm layers use batch statistics only with `bn_train`
    (default: running statistics, mmdet's `norm_eval=True` / detectron2's FrozenBN for detection)."""
    model.eval()
    if bn_train:
        model.train()
    else:
        model.set_attributes(deterministic=False, raise_if_not_found=False)
    return model


def trunk_params(model: Detector):
    """The trunk's parameters (State)."""
    return nnx.state(getattr(model, TRUNK), nnx.Param)


def num_params(module: nnx.Module) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param))))
