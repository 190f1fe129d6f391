"""Per-element fine-tuning augmentations of the BoB recipe (bob-spec.md §3.1) as grain transforms.

The original fine-tuning runs timm's `create_transform(is_training=True, auto_augment='rand-m9-mstd0.5-inc1',
color_jitter=0.4, hflip=0.5, scale=(0.08, 1), interpolation='random')` (timm 0.6.12; the same code path in
timm 1.0, `timm/data/transforms_factory.py::transforms_imagenet_train`):

  RandomResizedCropAndInterpolation -> RandomHorizontalFlip -> RandAugment   (ColorJitter is dropped when
  an auto-augment policy is set) -> ToTensor -> Normalize -> RandomErasing

This module reimplements the PIL stages (RandAugment, ColorJitter, and the chain `FinetuneTrainTransform`)
on uint8 HxWx3 arrays, drawing every random number from grain's per-element numpy Generator instead of
Python's global `random` / `np.random` state, so augmentation is reproducible from the dataset seed and
the element index. The ops themselves are the PIL calls timm makes, so for the same random decisions the
outputs are identical. Random erasing, mixup and cutmix act on normalised batches on the device
(`bob_jax.data.batch_augment`).

RandAugment (timm `auto_augment.py`): per image, `num_layers` ops are drawn uniformly with replacement;
each is applied with probability `prob`; its magnitude is N(m, mstd) clipped to [0, mmax] (default 10),
mapped to the op argument by timm's level-to-arg functions (signed ops flip their sign with
probability 1/2); geometric ops fill with `img_mean` and resample with bilinear or bicubic at random
(interpolation 'random') or with the given interpolation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from bob_jax.backbones.preprocess import Preprocess
from bob_jax.data.transforms import _apply, _check_uint8, resized_crop, rrc_params, to_rgb

__all__ = [
    "ColorJitter",
    "FinetuneTrainTransform",
    "RandAugment",
    "RAND_INCREASING_OPS",
    "RAND_OPS",
    "apply_op",
    "color_jitter",
    "level_to_arg",
    "rand_augment_hparams",
]

LEVEL_DENOM = 10.0  # timm `_LEVEL_DENOM`: magnitude M maps to the fraction M / 10 of each op's range

# timm `_RAND_TRANSFORMS` / `_RAND_INCREASING_TRANSFORMS` (in this order: ops are drawn by index).
RAND_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip

# Ops whose argument flips sign with probability 1/2 (timm `_randomly_negate`).
_SIGNED = {
    "Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
}  # fmt: skip
# Ops that resample (take `resample` and `fillcolor`).
_GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"}

_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC}  # fmt: skip
_RANDOM_RESAMPLE = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)  # timm `_RANDOM_INTERPOLATION`


def rand_augment_hparams(
    input_size: int | Sequence[int], mean: Sequence[float], interpolation: str = "random"
) -> dict[str, Any]:
    """The hparams timm's `transforms_imagenet_train` hands to `rand_augment_transform`:
    `translate_const = int(0.45 * min(size))` (absolute translations only; the Rel ops use
    `translate_pct`, default 0.45), `img_mean = round(255 * mean)` per channel (the fill colour), and
    `interpolation` unless it is 'random'."""
    size_min = input_size if isinstance(input_size, int) else min(input_size)
    hp: dict[str, Any] = {
        "translate_const": int(size_min * 0.45),
        "img_mean": tuple(min(255, round(255 * x)) for x in mean),
    }
    if interpolation and interpolation != "random":
        hp["interpolation"] = interpolation
    return hp


# --------------------------------------------------------------------------------------------------
# Level -> argument (timm's `LEVEL_TO_ARG` functions, sign flip made explicit by `negate`)
# --------------------------------------------------------------------------------------------------


def level_to_arg(name: str, level: float, hparams: dict | None = None, negate: bool = False) -> tuple:
    """The argument tuple timm passes to op `name` at magnitude `level` (0..10). `negate` is the outcome
    of timm's `_randomly_negate` (only signed ops use it)."""
    hparams = hparams or {}
    sign = -1.0 if negate else 1.0
    frac = level / LEVEL_DENOM
    if name in ("AutoContrast", "Equalize", "Invert"):
        return ()
    if name == "Rotate":
        return (sign * frac * 30.0,)
    if name == "Posterize":
        return (int(frac * 4),)
    if name == "PosterizeIncreasing":
        return (4 - int(frac * 4),)
    if name == "PosterizeOriginal":
        return (int(frac * 4) + 4,)
    if name == "Solarize":
        return (min(256, int(frac * 256)),)
    if name == "SolarizeIncreasing":
        return (256 - min(256, int(frac * 256)),)
    if name == "SolarizeAdd":
        return (min(128, int(frac * 110)),)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (frac * 1.8 + 0.1,)
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        # 'No change' is 1.0; the factor moves away towards 0.1 or 1.9 as the level grows.
        return (max(0.1, 1.0 + sign * frac * 0.9),)
    if name in ("ShearX", "ShearY"):
        return (sign * frac * 0.3,)
    if name in ("TranslateX", "TranslateY"):
        return (sign * frac * float(hparams.get("translate_const", 250)),)
    if name in ("TranslateXRel", "TranslateYRel"):
        return (sign * frac * hparams.get("translate_pct", 0.45),)
    raise ValueError(f"unknown RandAugment op {name!r}; known: {sorted(_OPS)}")


# --------------------------------------------------------------------------------------------------
# PIL ops (the calls timm makes)
# --------------------------------------------------------------------------------------------------


def _affine(img: Image.Image, matrix, resample, fillcolor) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fillcolor)


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keep the `bits` most significant bits. PosterizeIncreasing at magnitude 10 asks for 0 bits: Pillow
    before 10.x returned a black image there (mask ~255), newer Pillow raises (and so does timm with it);
    the lookup table below keeps the original black-image behaviour and equals `ImageOps.posterize` for
    1..7 bits."""
    if bits >= 8:
        return img
    mask = ~(2 ** (8 - bits) - 1)
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


_OPS: dict[str, Callable[..., Image.Image]] = {
    "AutoContrast": lambda img, **_: ImageOps.autocontrast(img),
    "Equalize": lambda img, **_: ImageOps.equalize(img),
    "Invert": lambda img, **_: ImageOps.invert(img),
    "Rotate": lambda img, deg, resample, fillcolor: img.rotate(deg, resample=resample, fillcolor=fillcolor),
    "Posterize": lambda img, bits, **_: _posterize(img, bits),
    "PosterizeIncreasing": lambda img, bits, **_: _posterize(img, bits),
    "PosterizeOriginal": lambda img, bits, **_: _posterize(img, bits),
    "Solarize": lambda img, thresh, **_: ImageOps.solarize(img, thresh),
    "SolarizeIncreasing": lambda img, thresh, **_: ImageOps.solarize(img, thresh),
    "SolarizeAdd": lambda img, add, **_: _solarize_add(img, add),
    "Color": lambda img, f, **_: ImageEnhance.Color(img).enhance(f),
    "ColorIncreasing": lambda img, f, **_: ImageEnhance.Color(img).enhance(f),
    "Contrast": lambda img, f, **_: ImageEnhance.Contrast(img).enhance(f),
    "ContrastIncreasing": lambda img, f, **_: ImageEnhance.Contrast(img).enhance(f),
    "Brightness": lambda img, f, **_: ImageEnhance.Brightness(img).enhance(f),
    "BrightnessIncreasing": lambda img, f, **_: ImageEnhance.Brightness(img).enhance(f),
    "Sharpness": lambda img, f, **_: ImageEnhance.Sharpness(img).enhance(f),
    "SharpnessIncreasing": lambda img, f, **_: ImageEnhance.Sharpness(img).enhance(f),
    "ShearX": lambda img, s, resample, fillcolor: _affine(img, (1, s, 0, 0, 1, 0), resample, fillcolor),
    "ShearY": lambda img, s, resample, fillcolor: _affine(img, (1, 0, 0, s, 1, 0), resample, fillcolor),
    "TranslateX": lambda img, px, resample, fillcolor: _affine(img, (1, 0, px, 0, 1, 0), resample, fillcolor),
    "TranslateY": lambda img, px, resample, fillcolor: _affine(img, (1, 0, 0, 0, 1, px), resample, fillcolor),
    "TranslateXRel": lambda img, pct, resample, fillcolor: _affine(
        img, (1, 0, pct * img.size[0], 0, 1, 0), resample, fillcolor
    ),
    "TranslateYRel": lambda img, pct, resample, fillcolor: _affine(
        img, (1, 0, 0, 0, 1, pct * img.size[1]), resample, fillcolor
    ),
}


def _resample_of(interpolation: str) -> Image.Resampling:
    try:
        return _RESAMPLE[interpolation]
    except KeyError:
        raise ValueError(f"interpolation {interpolation!r} is not one of {(*_RESAMPLE, 'random')}") from None


def _apply_pil(
    img: Image.Image, name: str, level: float, negate: bool, hparams: dict, resample
) -> Image.Image:
    args = level_to_arg(name, level, hparams, negate)
    if name in _GEOMETRIC:
        fill = tuple(hparams.get("img_mean", (128, 128, 128)))
        return _OPS[name](img, *args, resample=resample, fillcolor=fill)
    return _OPS[name](img, *args)


def apply_op(
    image: np.ndarray,
    name: str,
    level: float,
    *,
    negate: bool = False,
    hparams: dict | None = None,
    interpolation: str = "bicubic",
) -> np.ndarray:
    """One RandAugment op at a fixed magnitude `level` on a uint8 HxWx3 image (deterministic): timm's
    `AugmentOp(name, prob=1, magnitude=level)` with its sign draw fixed to `negate` and its resampling
    filter fixed to `interpolation`."""
    image = _check_uint8(image)
    if name not in _OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {sorted(_OPS)}")
    img = _apply_pil(Image.fromarray(image), name, level, negate, hparams or {}, _resample_of(interpolation))
    return np.asarray(img)


# --------------------------------------------------------------------------------------------------
# RandAugment
# --------------------------------------------------------------------------------------------------


def _parse_rand_config(config: str) -> dict[str, Any]:
    """'rand-m9-mstd0.5-inc1' -> magnitude, num_layers, prob, magnitude_std, magnitude_max, increasing
    (timm `rand_augment_transform`'s parser; transform-set selection 't...' is not supported)."""
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError(
            f"RandAugment config must start with 'rand', got {config!r} (e.g. 'rand-m9-mstd0.5-inc1')"
        )
    out = {"magnitude": 10.0, "num_layers": 2, "prob": 0.5, "magnitude_std": 0.0, "magnitude_max": None,
           "increasing": False}  # fmt: skip
    for part in parts[1:]:
        key_val = re.split(r"(\d.*)", part)
        if len(key_val) < 2:
            continue
        key, val = key_val[:2]
        if key == "mstd":
            std = float(val)
            out["magnitude_std"] = float("inf") if std > 100 else std  # > 100 means uniform in [0, m]
        elif key == "mmax":
            out["magnitude_max"] = int(val)
        elif key == "inc":
            out["increasing"] = bool(int(val))
        elif key == "m":
            out["magnitude"] = int(val)
        elif key == "n":
            out["num_layers"] = int(val)
        elif key == "p":
            out["prob"] = float(val)
        else:
            raise ValueError(
                f"unknown RandAugment config section {part!r} in {config!r} (m, n, p, mstd, mmax, inc)"
            )
    return out


class RandAugment(grain.transforms.RandomMap):
    """timm `rand_augment_transform(config, hparams)` as a grain RandomMap on uint8 HxWx3 images.

    `hparams`: as timm's (`translate_const`, `translate_pct`, `img_mean`, `interpolation`); build them with
    `rand_augment_hparams(input_size, mean, interpolation)` to match `create_transform`. An
    `interpolation` in hparams fixes the resampling filter; without it each geometric op picks bilinear
    or bicubic at random, as timm does.
    """

    def __init__(self, config: str = "rand-m9-mstd0.5-inc1", hparams: dict | None = None):
        cfg = _parse_rand_config(config)
        self.config = config
        self.hparams = dict(hparams or {"translate_const": 250, "img_mean": (128, 128, 128)})
        self.magnitude = float(cfg["magnitude"])
        self.num_layers = int(cfg["num_layers"])
        self.prob = float(cfg["prob"])
        self.magnitude_std = float(self.hparams.get("magnitude_std", cfg["magnitude_std"]))
        self.magnitude_max = self.hparams.get("magnitude_max", cfg["magnitude_max"])
        self.ops = RAND_INCREASING_OPS if cfg["increasing"] else RAND_OPS
        interp = self.hparams.get("interpolation")
        self.resample = None if interp is None else _resample_of(interp)
        if len(tuple(self.hparams.get("img_mean", (128, 128, 128)))) != 3:
            raise ValueError(
                f"hparams['img_mean'] needs three channel values, got {self.hparams['img_mean']}"
            )

    def sample_magnitude(self, rng: np.random.Generator) -> float:
        m = self.magnitude
        if self.magnitude_std == float("inf"):
            m = rng.uniform(0.0, m)
        elif self.magnitude_std > 0:
            m = rng.normal(m, self.magnitude_std)
        upper = self.magnitude_max or LEVEL_DENOM
        return max(0.0, min(m, upper))

    def augment(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        image = _check_uint8(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(
                f"RandAugment needs an HxWx3 RGB image, got shape {image.shape} (apply ToRGB first)"
            )
        img = Image.fromarray(image)
        # np.random.choice(ops, n, replace=True) in timm: independent uniform picks.
        for idx in rng.integers(0, len(self.ops), size=self.num_layers):
            name = self.ops[int(idx)]
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            level = self.sample_magnitude(rng)
            negate = bool(rng.random() > 0.5) if name in _SIGNED else False
            resample = None
            if name in _GEOMETRIC:
                resample = self.resample or _RANDOM_RESAMPLE[int(rng.integers(0, 2))]
            img = _apply_pil(img, name, level, negate, self.hparams, resample)
        return np.asarray(img)

    def random_map(self, element, rng: np.random.Generator):
        return _apply(element, lambda im: self.augment(im, rng))


# --------------------------------------------------------------------------------------------------
# ColorJitter
# --------------------------------------------------------------------------------------------------


def color_jitter(
    image: np.ndarray, brightness: float = 1.0, contrast: float = 1.0, saturation: float = 1.0,
    order: Sequence[int] = (0, 1, 2),
) -> np.ndarray:  # fmt: skip
    """torchvision's PIL `adjust_brightness` / `adjust_contrast` / `adjust_saturation` (ImageEnhance
    Brightness / Contrast / Color) at fixed factors, applied in `order` (0 = brightness, 1 = contrast,
    2 = saturation)."""
    img = Image.fromarray(_check_uint8(image))
    factors = (brightness, contrast, saturation)
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for i in order:
        img = enhancers[i](img).enhance(factors[i])
    return np.asarray(img)


def _jitter_range(value: float | Sequence[float], name: str) -> tuple[float, float] | None:
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"ColorJitter {name} must be non-negative, got {value}")
        lo, hi = max(0.0, 1.0 - value), 1.0 + value
    else:
        lo, hi = (float(v) for v in value)
        if not 0 <= lo <= hi:
            raise ValueError(f"ColorJitter {name} range must satisfy 0 <= min <= max, got {value}")
    return None if lo == hi == 1.0 else (lo, hi)


class ColorJitter(grain.transforms.RandomMap):
    """torchvision `ColorJitter(brightness, contrast, saturation)` (hue 0, as timm passes a scalar jitter)
    on uint8 HxWx3: the enabled adjustments in a random order, each factor uniform in
    [max(0, 1 - v), 1 + v]."""

    def __init__(self, brightness=0.4, contrast=0.4, saturation=0.4):
        names = ("brightness", "contrast", "saturation")
        self.ranges = tuple(
            _jitter_range(v, n) for v, n in zip((brightness, contrast, saturation), names, strict=True)
        )

    def jitter(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        order = rng.permutation(3)
        factors = [1.0, 1.0, 1.0]
        for i, r in enumerate(self.ranges):
            if r is not None:
                factors[i] = float(rng.uniform(r[0], r[1]))
        active = [int(i) for i in order if self.ranges[int(i)] is not None]
        if not active:
            return image
        return color_jitter(image, *factors, order=active)

    def random_map(self, element, rng: np.random.Generator):
        return _apply(element, lambda im: self.jitter(im, rng))


# --------------------------------------------------------------------------------------------------
# The fine-tuning train transform
# --------------------------------------------------------------------------------------------------


class FinetuneTrainTransform(grain.transforms.RandomMap):
    """timm `transforms_imagenet_train` up to the PIL stage, uint8 HxWx3 out:
    ToRGB -> RandomResizedCrop(input_size, scale, ratio, interpolation) -> horizontal flip(hflip) ->
    RandAugment(auto_augment) if set, else ColorJitter(color_jitter) (timm disables colour jitter when
    an auto-augment policy is given). `interpolation='random'` picks bilinear or bicubic per image for
    the crop (and per op inside RandAugment); None uses the backbone's `preprocess.interpolation`.
    Normalisation, random erasing and mixup/cutmix follow on the device (`batch_augment`)."""

    def __init__(
        self,
        preprocess: Preprocess,
        *,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        color_jitter: float | None = 0.4,
        hflip: float = 0.5,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str | None = "random",
    ):
        interpolation = interpolation or preprocess.interpolation
        if interpolation != "random":
            _resample_of(interpolation)
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip probability must lie in [0, 1], got {hflip}")
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"need 0 < min <= max for scale {scale} and ratio {ratio}")
        self.preprocess, self.interpolation = preprocess, interpolation
        self.hflip, self.scale, self.ratio = float(hflip), tuple(scale), tuple(ratio)
        hparams = rand_augment_hparams(preprocess.input_size, preprocess.mean, interpolation)
        self.rand_augment = RandAugment(auto_augment, hparams) if auto_augment else None
        self.color_jitter = (
            ColorJitter(color_jitter, color_jitter, color_jitter)
            if color_jitter is not None and self.rand_augment is None
            else None
        )

    def transform(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        image = to_rgb(image)
        top, left, h, w = rrc_params(image.shape[0], image.shape[1], rng, self.scale, self.ratio)
        interp = self.interpolation
        if interp == "random":
            interp = ("bilinear", "bicubic")[int(rng.integers(0, 2))]
        image = resized_crop(image, top, left, h, w, self.preprocess.input_size, interp)
        if self.hflip > 0 and rng.random() < self.hflip:
            image = np.ascontiguousarray(image[:, ::-1])
        if self.color_jitter is not None:
            image = self.color_jitter.jitter(image, rng)
        if self.rand_augment is not None:
            image = self.rand_augment.augment(image, rng)
        return image

    def random_map(self, element, rng: np.random.Generator):
        return _apply(element, lambda im: self.transform(im, rng))

