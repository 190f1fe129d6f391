"""Per-backbone input preprocessing, as timm's pretrained_cfg describes it.

Images travel through the input pipeline as uint8 (cheap to batch and ship); scaling to [0, 1] and
mean/std normalisation happen on the device inside the jitted step (`normalize`).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
CROP_MODES = ("center", "squash")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Eval transform of a pretrained backbone (timm `transforms_factory.transforms_imagenet_eval`).

    crop_mode "center": resize the shorter side to `floor(input_size / crop_pct)` with
    `interpolation`; "squash": resize both sides to that size (aspect ratio not kept; timm's mode
    for e.g. EVA-02 448 fine-tunes). Then centre-crop `input_size` x `input_size`, scale to [0, 1],
    normalise with `mean` / `std`.
    """

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_mode: str = "center"

    def __post_init__(self):
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode {self.crop_mode!r} is not one of {CROP_MODES}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must lie in (0, 1], got {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need three channel values")

    @property
    def resize_size(self) -> int:
        """Shorter-side size before the centre crop (timm: `floor(size / crop_pct)`)."""
        return int(math.floor(self.input_size / self.crop_pct))

    def replace(self, **changes) -> Preprocess:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def normalize(images, preprocess: Preprocess, dtype=jnp.float32):
    """uint8 (or [0, 255] float) NHWC images -> normalised float images, on the device."""
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    mean = jnp.asarray(preprocess.mean, jnp.float32)
    std = jnp.asarray(preprocess.std, jnp.float32)
    return ((x - mean) / std).astype(dtype)
