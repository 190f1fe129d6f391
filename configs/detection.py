"""Detection and instance segmentation: Mask R-CNN / Cascade (Mask) R-CNN on one backbone (bob-spec 3.4).

Default (no arg): the OFFLINE run, on a fresh machine without network: EfficientNet-Lite0 with its real
ImageNet weights, frozen trunk, Mask R-CNN with narrow heads at 128 px on the embedded synthetic shapes
(written under <workdir>/data on first use), evaluated on its test split and on the domain-shifted twin.

    python -m bob_jax.main --config=configs/detection.py --workdir=/tmp/det
    python -m bob_jax.main --workdir=/tmp/det \
        --config=configs/detection.py:backbone=vit_small_patch16_224.augreg_in1k,weights=random,head=cascade_mask_rcnn
    # the original's setting on COCO (1024 px LSJ, 256-channel heads, 36 epochs at batch 16):
    python -m bob_jax.main --workdir=runs/coco --config=configs/detection.py:recipe=bob,\
backbone=vit_base_patch16_224.mae,head=cascade_mask_rcnn,protocol=finetune,\
dataset=coco:/data/coco/annotations/instances_train2017.json:/data/coco/train2017,\
test_dataset=coco:/data/coco/annotations/instances_val2017.json:/data/coco/val2017
    # OOD detection, Sim10k -> Cityscapes (box-only Cascade R-CNN, class car, lr 1e-4):
    python -m bob_jax.main --workdir=runs/sim2real --config=configs/detection.py:recipe=bob,head=cascade_rcnn,\
backbone=resnet50.tv_in1k,dataset=coco:/data/sim10k/train.json:/data/sim10k/images,\
ood_dataset=coco:/data/cityscapes/instancesonly_filtered_gtFine_val.json:/data/cityscapes/leftImg8bit/val,\
categories=car

Args: backbone (`[label=]name@weights`), weights (pretrained | random | path; overrides the spec's),
head (mask_rcnn | cascade_mask_rcnn | cascade_rcnn), protocol (frozen | finetune: the trunk), neck
(vitdet | bob: plain ViTs' pyramid), dataset (synthetic | coco:<json>:<dir>), test_dataset and
ood_dataset (coco:<json>:<dir>; with the synthetic set: its test split and shifted twin), categories
(`+`-separated class names), image_size, steps (0: 36 epochs), batch_size, lr, seed, recipe (local: the
CPU-sized model and schedule, recorded as protocol "local"; bob: the original's, protocol "bob").
Plain ViTs get the ViTDet trunk, EVA-02s EVA-02's own (RoPE, SwiGLU; window 16 under recipe bob).
"""

import dataclasses

import ml_collections

from bob_jax.config_lib import lock, parse_arg

LOCAL = "local"
BOB = "bob"


def _section(dataclass, values: dict, exclude=()) -> ml_collections.ConfigDict:
    """Every field of `dataclass` (so that any can be overridden on the command line), its defaults
    replaced by `values`."""
    fields = {f.name: f.default for f in dataclasses.fields(dataclass) if f.name not in exclude}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{dataclass.__name__} has no field(s) {unknown}")
    return ml_collections.ConfigDict({**fields, **values})


def _model(recipe: str, head: str, neck: str, image_size: int, backbone: str) -> ml_collections.ConfigDict:
    """DetectorConfig fields besides backbone/weights/num_classes/seed."""
    from bob_jax.detection.model import DetectorConfig

    if recipe == BOB:  # detectron2 / the original's widths and sizes (DetectorConfig's defaults)
        values = dict(head=head, neck=neck, image_size=image_size or 1024, drop_path_rate=0.1,
                      cascade_style="mmdet")
        if _is_eva02(backbone):  # EVA-02's own detection recipe: window 16 at 1024 px (detectron2's ViTs: 14)
            from bob_jax.detection.eva02det import EVA02_WINDOW

            values["window_size"] = EVA02_WINDOW
    else:  # narrow heads, 64 RoIs per image: a few hundred CPU steps at 128 px (the overfitting test's model)
        values = dict(
            head=head, neck=neck, image_size=image_size or 128, drop_path_rate=0.0, neck_channels=64,
            box_head_convs=0, box_head_conv_dim=64, box_head_fc_dim=256, mask_head_convs=2, mask_head_conv_dim=64,
            rpn_pre_nms_topk=(256, 256), rpn_post_nms_topk=(128, 128), rpn_batch_size_per_image=128,
            roi_batch_size_per_image=64, detections_per_image=50, cascade_style="detectron2",
        )
    return _section(DetectorConfig, values, exclude=("backbone", "weights", "num_classes", "seed"))


def _is_eva02(backbone: str) -> bool:
    from bob_jax.backbones import zoo
    from bob_jax.battle import parse_backbone

    family = zoo.ARCH_TO_FAMILY.get(parse_backbone(backbone)[0].partition(".")[0])
    return family is not None and family.name == "eva"


def _train(recipe: str, protocol: str, steps: int, batch_size: int, lr: float) -> ml_collections.ConfigDict:
    """TrainConfig fields besides seed, plus `epochs` (the length when steps is 0)."""
    from bob_jax.detection.train import TrainConfig

    if recipe == BOB:  # AdamW wd 0.05, warm-up 1,000, x0.1 at epochs 27 and 33 of 36, LSJ 0.1-2.0
        values = dict(protocol=protocol, steps=steps, batch_size=batch_size or 16, lr=lr or 1e-4,
                      checkpoint_every=5000, num_threads=8)
    else:  # heads trained from scratch in a few hundred steps: a larger lr, milder jitter
        values = dict(
            protocol=protocol, steps=steps or 300, batch_size=batch_size or 8, lr=lr or 1e-3, warmup_steps=20,
            lsj_scale=(0.8, 1.25), max_instances=16, checkpoint_every=100, log_every=25, num_threads=2,
        )
    section = _section(TrainConfig, values, exclude=("seed",))
    section.epochs = 36
    return section


def get_config(arg=None):
    arg = parse_arg(
        arg,
        backbone="tf_efficientnet_lite0.offline",
        weights="",
        head="mask_rcnn",
        protocol="frozen",
        neck="vitdet",
        dataset="synthetic",
        test_dataset="",
        ood_dataset="",
        categories=(),
        image_size=0,
        steps=0,
        batch_size=0,
        lr=0.0,
        seed=0,
        recipe=LOCAL,
    )
    if arg.recipe not in (LOCAL, BOB):
        raise ValueError(f"recipe={arg.recipe!r}: use {LOCAL!r} (CPU-sized) or {BOB!r} (the original's)")
    synthetic = arg.dataset == "synthetic"
    if synthetic and (arg.test_dataset or arg.ood_dataset or arg.categories):
        raise ValueError("test_dataset, ood_dataset and categories go with dataset=coco:<json>:<dir>; the "
                         "synthetic set brings its own test split and shifted twin")
    c = ml_collections.ConfigDict()
    c.job = "detection"
    c.backbone = arg.backbone
    c.weights = arg.weights  # overrides the spec's weights: pretrained | random | a path
    c.protocol = arg.recipe  # recorded with every result; the report never ranks protocols together
    c.seed = arg.seed
    c.mesh = ""  # "data=-1" style; empty: every device on the "data" axis
    c.eval_batch_size = 8
    c.progress = True
    c.force = False
    c.model = _model(arg.recipe, arg.head, arg.neck, arg.image_size, arg.backbone)
    c.train = _train(arg.recipe, arg.protocol, arg.steps, arg.batch_size, arg.lr)
    c.dataset = ml_collections.ConfigDict(dict(
        name=arg.dataset, test=arg.test_dataset, ood=arg.ood_dataset, category_names=tuple(arg.categories),
        dataset_name="", ood_name="", num_train=64, num_test=32, seed=0,
    ))
    return lock(c)
