"""Image transforms as grain `Map` / `RandomMap` classes (numpy + PIL, uint8 in and out).

Eval: timm's `transforms_factory` eval path with `crop_mode='center'`
(`Resize(floor(size / crop_pct), interpolation)` on the shorter side -> `CenterCrop(size)`; 'squash'
resizes both sides), through PIL exactly as torchvision does for PIL images, so results equal
timm/torchvision bit for bit.
Train: torchvision's `RandomResizedCrop` sampling (10 attempts, then the central fallback) and
`RandomHorizontalFlip`, drawing from the per-element numpy Generator that grain derives from the
dataset seed and the element index (deterministic, resumable, identical across worker counts).

Outputs stay uint8 HxWx3; scaling and mean/std normalisation run on the device
(`bob_jax.backbones.preprocess.normalize`). The original BoB linear probe normalises every backbone
with fixed ImageNet statistics: that is `Preprocess(..., mean=IMAGENET_MEAN, std=IMAGENET_STD)`, nothing
changes here.

Each op works on an array or on an element dict (it replaces `element["image"]`), so the same objects
serve tests, pipelines and ad-hoc use. Function forms: `to_rgb`, `resize_shorter`, `center_crop`,
`resized_crop`, `rrc_params`.
"""

from __future__ import annotations

import math
from typing import Any

import grain
import numpy as np
from PIL import Image

from bob_jax.backbones.preprocess import Preprocess

__all__ = [
    "CenterCrop",
    "Compose",
    "EvalTransform",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "ResizeShorter",
    "ToRGB",
    "TrainTransform",
    "center_crop",
    "resize_shorter",
    "resized_crop",
    "rrc_params",
    "to_rgb",
]

PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def _resample(interpolation: str) -> Image.Resampling:
    try:
        return PIL_INTERPOLATION[interpolation]
    except KeyError:
        raise ValueError(
            f"interpolation {interpolation!r} is not one of {tuple(PIL_INTERPOLATION)}"
        ) from None


def _check_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype} (shape {image.shape})")
    return image


# --------------------------------------------------------------------------------------------------
# Functional forms
# --------------------------------------------------------------------------------------------------


def to_rgb(image: np.ndarray) -> np.ndarray:
    """HxW / HxWx1 (grey) -> HxWx3; HxWx2 (grey+alpha) -> grey x3; HxWx4 (RGBA) -> RGB (alpha dropped,
    as PIL's `convert("RGB")` does); HxWx3 unchanged."""
    image = _check_uint8(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"expected an HxW or HxWxC image, got shape {image.shape}")
    c = image.shape[-1]
    if c == 3:
        return image
    if c in (1, 2):
        return np.ascontiguousarray(np.repeat(image[..., :1], 3, axis=-1))
    if c == 4:
        return np.ascontiguousarray(image[..., :3])
    raise ValueError(f"cannot convert an image with {c} channels to RGB (shape {image.shape})")


def _to_pil(image: np.ndarray) -> Image.Image:
    image = _check_uint8(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return Image.fromarray(np.ascontiguousarray(image))


def _from_pil(img: Image.Image, like: np.ndarray) -> np.ndarray:
    out = np.asarray(img)
    if like.ndim == 3 and like.shape[-1] == 1:
        out = out[..., None]
    return out


def resize_shorter(image: np.ndarray, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Resize so the shorter side is `size`, keeping the aspect ratio (torchvision `Resize(int)`:
    the longer side becomes `int(size * long / short)`). PIL's filters antialias when downscaling,
    like torchvision's PIL path."""
    image = _check_uint8(image)
    h, w = image.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_h, new_w) == (h, w):
        return image
    return _from_pil(_to_pil(image).resize((new_w, new_h), _resample(interpolation)), image)


def resize_square(image: np.ndarray, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Resize both sides to `size` (timm `crop_mode='squash'`), with PIL's antialiasing filters."""
    image = _check_uint8(image)
    if image.shape[:2] == (size, size):
        return image
    return _from_pil(_to_pil(image).resize((size, size), _resample(interpolation)), image)


def center_crop(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """torchvision/timm `CenterCrop`: top = int(round((h - size) / 2.0)) (Python rounding, half to even);
    images smaller than the crop are zero-padded first, as torchvision does."""
    image = _check_uint8(image)
    ch, cw = (size, size) if isinstance(size, int) else size
    h, w = image.shape[:2]
    if ch > h or cw > w:
        pad_top, pad_left = (ch - h) // 2 if ch > h else 0, (cw - w) // 2 if cw > w else 0
        pad_bottom, pad_right = (ch - h + 1) // 2 if ch > h else 0, (cw - w + 1) // 2 if cw > w else 0
        widths = [(pad_top, pad_bottom), (pad_left, pad_right)] + [(0, 0)] * (image.ndim - 2)
        image = np.pad(image, widths)
        h, w = image.shape[:2]
        if (h, w) == (ch, cw):
            return image
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return np.ascontiguousarray(image[top : top + ch, left : left + cw])


def rrc_params(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision `RandomResizedCrop.get_params`: (top, left, h, w) of the crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the largest central crop whose aspect ratio lies inside `ratio`.
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(
    image: np.ndarray, top: int, left: int, h: int, w: int, size: int | tuple[int, int], interpolation: str
) -> np.ndarray:
    """torchvision `F.resized_crop` on a PIL image: crop (top, left, h, w), then resize to `size`."""
    oh, ow = (size, size) if isinstance(size, int) else size
    img = _to_pil(image).crop((left, top, left + w, top + h))
    return _from_pil(img.resize((ow, oh), _resample(interpolation)), image)


# --------------------------------------------------------------------------------------------------
# grain transforms
# --------------------------------------------------------------------------------------------------


def _apply(element: Any, fn) -> Any:
    """Apply `fn` to the image of an element dict (copying the dict) or to a bare array."""
    if isinstance(element, dict):
        out = dict(element)
        out["image"] = fn(element["image"])
        return out
    return fn(element)


class ToRGB(grain.transforms.Map):
    """Grey / grey+alpha / RGBA uint8 -> HxWx3 uint8."""

    def map(self, element):
        return _apply(element, to_rgb)


class ResizeShorter(grain.transforms.Map):
    """Resize the shorter side to `size` with PIL (`interpolation`: nearest / bilinear / bicubic)."""

    def __init__(self, size: int, interpolation: str = "bicubic"):
        _resample(interpolation)
        if size <= 0:
            raise ValueError(f"resize size must be positive, got {size}")
        self.size, self.interpolation = int(size), interpolation

    def map(self, element):
        return _apply(element, lambda im: resize_shorter(im, self.size, self.interpolation))


class ResizeSquare(ResizeShorter):
    """Resize both sides to `size` (aspect ratio not kept)."""

    def map(self, element):
        return _apply(element, lambda im: resize_square(im, self.size, self.interpolation))


class CenterCrop(grain.transforms.Map):
    """Centre crop to `size` x `size` (timm/torchvision rounding)."""

    def __init__(self, size: int | tuple[int, int]):
        self.size = size

    def map(self, element):
        return _apply(element, lambda im: center_crop(im, self.size))


class Compose(grain.transforms.Map):
    """Deterministic ops applied in order (one grain map step, one pickle)."""

    def __init__(self, ops):
        self.ops = tuple(ops)

    def map(self, element):
        for op in self.ops:
            element = op.map(element)
        return element


class EvalTransform(Compose):
    """timm eval transform of a backbone: ToRGB -> resize (shorter side, or both sides for
    crop_mode 'squash') to `resize_size` -> CenterCrop(input_size)."""

    def __init__(self, preprocess: Preprocess):
        self.preprocess = preprocess
        resize = ResizeSquare if preprocess.crop_mode == "squash" else ResizeShorter
        super().__init__(
            [
                ToRGB(),
                resize(preprocess.resize_size, preprocess.interpolation),
                CenterCrop(preprocess.input_size),
            ]
        )


class RandomResizedCrop(grain.transforms.RandomMap):
    """torchvision `RandomResizedCrop(size, scale, ratio, interpolation)` with grain's per-element rng."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bilinear",
    ):
        _resample(interpolation)
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"RandomResizedCrop needs 0 < min <= max for scale {scale} and ratio {ratio}")
        self.size, self.scale, self.ratio, self.interpolation = (
            int(size),
            tuple(scale),
            tuple(ratio),
            interpolation,
        )

    def crop(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        top, left, h, w = rrc_params(image.shape[0], image.shape[1], rng, self.scale, self.ratio)
        return resized_crop(image, top, left, h, w, self.size, self.interpolation)

    def random_map(self, element, rng: np.random.Generator):
        return _apply(element, lambda im: self.crop(im, rng))


class RandomHorizontalFlip(grain.transforms.RandomMap):
    """Mirror left-right with probability `p`."""

    def __init__(self, p: float = 0.5):
        if not 0 <= p <= 1:
            raise ValueError(f"flip probability must lie in [0, 1], got {p}")
        self.p = float(p)

    def flip(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.ascontiguousarray(image[:, ::-1]) if rng.random() < self.p else image

    def random_map(self, element, rng: np.random.Generator):
        return _apply(element, lambda im: self.flip(im, rng))


class TrainTransform(grain.transforms.RandomMap):
    """ToRGB -> RandomResizedCrop(input_size, interpolation of the backbone) -> RandomHorizontalFlip."""

    def __init__(
        self,
        preprocess: Preprocess,
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
    ):
        self.preprocess = preprocess
        self.to_rgb = ToRGB()
        self.rrc = RandomResizedCrop(preprocess.input_size, scale, ratio, preprocess.interpolation)
        self.flip = RandomHorizontalFlip(flip_p)

    def random_map(self, element, rng: np.random.Generator):
        element = self.to_rgb.map(element)
        element = self.rrc.random_map(element, rng)
        return self.flip.random_map(element, rng)
