"""Offline distribution shift for any source: fixed, seeded image corruptions at severities 1..5.

The operations and their severity constants follow Hendrycks & Dietterich, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations" (ICLR 2019; `make_imagenet_c.py` /
`make_cifar_c.py` of hendrycks/robustness), re-implemented here for uint8 images of any size:

| corruption       | ImageNet-C (> 64 px)         | CIFAR-10-C (<= 64 px)        | unit                 |
|------------------|------------------------------|------------------------------|----------------------|
| gaussian_noise   | 0.08, 0.12, 0.18, 0.26, 0.38 | 0.04, 0.06, 0.08, 0.09, 0.10 | std on [0, 1]        |
| gaussian_blur    | 1, 2, 3, 4, 6                | 0.4, 0.6, 0.7, 0.8, 1.0      | sigma, pixels        |
| contrast         | 0.4, 0.3, 0.2, 0.1, 0.05     | 0.75, 0.5, 0.4, 0.3, 0.15    | factor about mean    |
| jpeg_compression | 25, 18, 15, 10, 7            | 80, 65, 58, 50, 40           | JPEG quality         |
| pixelate         | 0.6, 0.5, 0.4, 0.3, 0.25     | 0.95, 0.9, 0.85, 0.75, 0.65  | downscale factor     |
| rotation         | 6, 12, 18, 24, 30            | 6, 12, 18, 24, 30            | degrees, random sign |

`table="auto"` (default) picks the CIFAR-10-C constants when the shorter image side is <= 64 px (the
constants were tuned for 32 px images; ImageNet-C's would, e.g., blur a 28 px Fashion-MNIST image away at
severity 2) and ImageNet-C's otherwise. Rotation is not an ImageNet-C corruption: its angles are this
module's choice (even steps up to 30 degrees; bilinear, about the centre, corners filled with 0, size
kept), with the sign drawn per example.

Exact operations (float64 on [0, 1], then rounded to uint8 — ImageNet-C truncates with `np.uint8`;
rounding avoids its -0.5 bias):
  gaussian_noise    clip(x + c * N(0, 1))
  gaussian_blur     per-channel Gaussian, truncated at 4 sigma, edge pixels repeated ('nearest'), as
                    ImageNet-C's `skimage.filters.gaussian(x, sigma=c, multichannel=True)`
  contrast          clip((x - m) * c + m), m the per-channel mean over the image
  jpeg_compression  PIL JPEG encode at quality c, decode
  pixelate          PIL BOX resize to (max(1, int(w * c)), max(1, int(h * c))), BOX resize back
  rotation          PIL `rotate(+/-c, BILINEAR, fillcolor=0)` on the uint8 image

Determinism: random draws (noise, rotation sign) come from PCG64 seeded with
`SeedSequence([seed, index, corruption id, severity])`, where `index` is the example's position in its
source, and are turned into normals/signs from the raw 64-bit stream (NumPy keeps `random_raw` streams
stable across releases, unlike `Generator.normal`). So a shifted test set is fixed by
(source, corruption, severity, seed), whatever the batch size, worker count or read order.

Images may be HxW, HxWx1 or HxWx3 uint8; the shape is kept. Use `corrupt(image, ...)` directly,
`Corrupt(...)` as a grain `Map` on pipeline elements (it reads `element["index"]`, which
`bob_jax.data.pipelines` adds), or `ShiftedSource(source, corruption, severity, seed)` to shift a source
itself (picklable; `describe()` records the shift).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from bob_jax.data.sources import get_source, read_many

__all__ = [
    "CORRUPTIONS",
    "Corrupt",
    "SEVERITY_TABLES",
    "ShiftedSource",
    "SMALL_IMAGE_MAX_SIDE",
    "corrupt",
    "get_shifted_source",
    "severity_parameter",
]

CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast", "jpeg_compression", "pixelate", "rotation")
_ROTATION_DEGREES = (6.0, 12.0, 18.0, 24.0, 30.0)
SEVERITY_TABLES: dict[str, dict[str, tuple[float, ...]]] = {
    "imagenet_c": {
        "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
        "gaussian_blur": (1.0, 2.0, 3.0, 4.0, 6.0),
        "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
        "jpeg_compression": (25, 18, 15, 10, 7),
        "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
        "rotation": _ROTATION_DEGREES,
    },
    "cifar10_c": {
        "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
        "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
        "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
        "jpeg_compression": (80, 65, 58, 50, 40),
        "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
        "rotation": _ROTATION_DEGREES,
    },
}
SMALL_IMAGE_MAX_SIDE = 64  # table="auto": shorter side <= this -> cifar10_c constants
_TABLES = ("auto", *SEVERITY_TABLES)
# Fixed ids (not list positions) so adding a corruption never changes another one's random stream.
_CORRUPTION_ID = {
    "gaussian_noise": 1,
    "gaussian_blur": 2,
    "contrast": 3,
    "jpeg_compression": 4,
    "pixelate": 5,
    "rotation": 6,
}


def _check(corruption: str, severity: int, table: str) -> tuple[str, int, str]:
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; choose one of {CORRUPTIONS}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer 1..5, got {severity!r}")
    if table not in _TABLES:
        raise ValueError(f"table must be one of {_TABLES}, got {table!r}")
    return corruption, int(severity), table


def _resolve_table(table: str, image: np.ndarray) -> str:
    if table != "auto":
        return table
    return "cifar10_c" if min(image.shape[:2]) <= SMALL_IMAGE_MAX_SIDE else "imagenet_c"


def severity_parameter(corruption: str, severity: int, table: str = "imagenet_c") -> float:
    """The constant `corruption` uses at `severity` in `table` ('imagenet_c' or 'cifar10_c')."""
    corruption, severity, table = _check(corruption, severity, table)
    if table == "auto":
        raise ValueError("severity_parameter needs an explicit table ('imagenet_c' or 'cifar10_c')")
    return SEVERITY_TABLES[table][corruption][severity - 1]


# --------------------------------------------------------------------------------------------------
# Version-stable random draws
# --------------------------------------------------------------------------------------------------


def _bit_generator(seed: int, index: int, corruption: str, severity: int) -> np.random.PCG64:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    entropy = [int(seed), int(index), _CORRUPTION_ID[corruption], severity]
    return np.random.PCG64(np.random.SeedSequence(entropy))


def _uniform(bitgen: np.random.PCG64, n: int) -> np.ndarray:
    """n floats in (0, 1) from the top 53 bits of the raw stream (never exactly 0: safe for log)."""
    raw = np.asarray(bitgen.random_raw(n), np.uint64)
    return ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _standard_normal(bitgen: np.random.PCG64, shape: tuple[int, ...]) -> np.ndarray:
    """Box-Muller normals from the raw stream (fixed across NumPy releases)."""
    n = int(np.prod(shape))
    m = (n + 1) // 2
    u1, u2 = _uniform(bitgen, m), _uniform(bitgen, m)
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2.0 * np.pi * u2), r * np.sin(2.0 * np.pi * u2)])[:n]
    return z.reshape(shape)


# --------------------------------------------------------------------------------------------------
# Operations (uint8 in, uint8 out, shape kept)
# --------------------------------------------------------------------------------------------------


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _as_hwc(image: np.ndarray) -> np.ndarray:
    return image[:, :, None] if image.ndim == 2 else image


def _gaussian_noise(image, c, bitgen):
    x = image.astype(np.float64) / 255.0
    return _to_uint8(x + c * _standard_normal(bitgen, x.shape))


def _gaussian_blur(image, sigma, bitgen):
    from scipy import ndimage

    x = _as_hwc(image).astype(np.float64) / 255.0
    out = ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0.0), mode="nearest", truncate=4.0)
    return _to_uint8(out).reshape(image.shape)


def _contrast(image, c, bitgen):
    x = _as_hwc(image).astype(np.float64) / 255.0
    means = x.mean(axis=(0, 1), keepdims=True)
    return _to_uint8((x - means) * c + means).reshape(image.shape)


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)


def _from_pil(im: Image.Image, like: np.ndarray) -> np.ndarray:
    return np.asarray(im, np.uint8).reshape(like.shape)


def _jpeg(image, quality, bitgen):
    buf = io.BytesIO()
    _pil(image).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return _from_pil(im.convert("L" if image.ndim == 2 or image.shape[2] == 1 else "RGB"), image)


def _pixelate(image, c, bitgen):
    h, w = image.shape[:2]
    im = _pil(image)
    small = im.resize((max(1, int(w * c)), max(1, int(h * c))), Image.Resampling.BOX)
    return _from_pil(small.resize((w, h), Image.Resampling.BOX), image)


def _rotation(image, degrees, bitgen):
    sign = 1.0 if int(bitgen.random_raw()) >> 63 else -1.0
    im = _pil(image)
    fill = 0 if im.mode == "L" else (0, 0, 0)
    return _from_pil(im.rotate(sign * degrees, resample=Image.Resampling.BILINEAR, fillcolor=fill), image)


_OPS = {
    "gaussian_noise": _gaussian_noise,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "jpeg_compression": _jpeg,
    "pixelate": _pixelate,
    "rotation": _rotation,
}


def corrupt(
    image: np.ndarray, corruption: str, severity: int, *, seed: int = 0, index: int = 0, table: str = "auto"
) -> np.ndarray:
    """`image` (uint8 HxW, HxWx1 or HxWx3) corrupted at `severity`; same shape and dtype.

    `index` (the example's position in its source) and `seed` fix the random draws of this example.
    """
    corruption, severity, table = _check(corruption, severity, table)
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"corrupt expects a uint8 image, got dtype {image.dtype} (shape {image.shape})")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))):
        raise ValueError(f"corrupt expects an HxW, HxWx1 or HxWx3 image, got shape {image.shape}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"empty image of shape {image.shape}")
    c = SEVERITY_TABLES[_resolve_table(table, image)][corruption][severity - 1]
    return _OPS[corruption](image, c, _bit_generator(seed, index, corruption, severity))


# --------------------------------------------------------------------------------------------------
# grain transform and shifted source
# --------------------------------------------------------------------------------------------------


class Corrupt(grain.transforms.Map):
    """grain `Map` corrupting `element["image"]`, seeded by `element["index"]` (pipelines add it).

    Put it before the resize/crop (e.g. `Compose([Corrupt(...), EvalTransform(preprocess)])`) so the
    shift happens at the data's native resolution, as ImageNet-C does at 224 px. Also accepts a bare
    array (index 0).
    """

    def __init__(self, corruption: str, severity: int, seed: int = 0, table: str = "auto"):
        self.corruption, self.severity, self.table = _check(corruption, severity, table)
        self.seed = int(seed)

    def map(self, element):
        if isinstance(element, dict):
            if "index" not in element:
                raise KeyError(
                    "Corrupt needs element['index'] (the example's position in its source) to seed its "
                    "draws; use it inside bob_jax.data.pipelines (which adds 'index') or wrap the source "
                    "in ShiftedSource instead"
                )
            out = dict(element)
            out["image"] = corrupt(
                element["image"],
                self.corruption,
                self.severity,
                seed=self.seed,
                index=int(element["index"]),
                table=self.table,
            )
            return out
        return corrupt(element, self.corruption, self.severity, seed=self.seed, index=0, table=self.table)

    def __repr__(self) -> str:
        return (
            f"Corrupt({self.corruption!r}, severity={self.severity}, seed={self.seed}, "
            f"table={self.table!r})"
        )


class ShiftedSource:
    """`source` with every image corrupted by (`corruption`, `severity`, `seed`); labels unchanged.

    Example `i` is corrupted with draws seeded by (seed, i), so the shifted set is fixed. Picklable when
    `source` is (it only holds the source and the parameters), so grain workers can read it.
    """

    def __init__(self, source, corruption: str, severity: int, seed: int = 0, *, table: str = "auto"):
        self.corruption, self.severity, self.table = _check(corruption, severity, table)
        if int(seed) < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.source, self.seed = source, int(seed)
        self.num_classes = source.num_classes
        self.class_names = source.class_names

    def __len__(self) -> int:
        return len(self.source)

    def _shift(self, index: int, ex: dict[str, Any]) -> dict[str, Any]:
        out = dict(ex)
        out["image"] = corrupt(
            ex["image"], self.corruption, self.severity, seed=self.seed, index=index, table=self.table
        )
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a source of {len(self)} examples")
        return self._shift(index, self.source[index])

    def _getitems(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        indices = [int(i) for i in indices]
        return [self._shift(i, ex) for i, ex in zip(indices, read_many(self.source, indices), strict=True)]

    def labels(self) -> np.ndarray:
        return self.source.labels()

    def describe(self) -> dict[str, Any]:
        desc = dict(self.source.describe())
        desc["shift"] = {
            "corruption": self.corruption,
            "severity": self.severity,
            "seed": self.seed,
            "table": self.table,
            "small_image_max_side": SMALL_IMAGE_MAX_SIDE,
            "rule": "bob_jax.data.corruptions v1: PCG64(SeedSequence([seed, index, id, severity]))",
        }
        return desc

    def __repr__(self) -> str:
        return (
            f"ShiftedSource({self.source!r}, {self.corruption!r}, severity={self.severity}, "
            f"seed={self.seed})"
        )


def get_shifted_source(
    spec: str,
    split: str = "test",
    *,
    corruption: str,
    severity: int,
    seed: int = 0,
    table: str = "auto",
    data_dir: str | os.PathLike | None = None,
    **kwargs,
) -> ShiftedSource:
    """`ShiftedSource(get_source(spec, split, ...), corruption, severity, seed)` (e.g. 'fashion_mnist')."""
    return ShiftedSource(
        get_source(spec, split, data_dir=data_dir, **kwargs), corruption, severity, seed, table=table
    )
