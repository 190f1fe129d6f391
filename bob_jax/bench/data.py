"""Input-pipeline benchmark: JPEG decode + training augmentation per core, and grain loader scaling.

The images are real photographs (scikit-image's and scikit-learn's bundled samples, random crops
re-encoded as JPEG at quality 90, ImageNet-like sizes), written into a temporary ImageFolder so the
decode path is the one training uses. Measured:
- in-process, one core: decode (`ImageFolder.__getitem__`), `TrainTransform` alone, and both;
- `train_dataset(..., num_workers=k)` for each requested k: batches/s after the first batch (the
  first batch's latency -- worker start-up -- is reported separately), uint8 batches checked.
Targets (performance.md section 6): >= 250 augmented img/s per core.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import tempfile
import time
from typing import Any

import numpy as np


def _sample_photos() -> list[np.ndarray]:
    photos = []
    try:
        import skimage.data as sd

        for fn in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"):
            if hasattr(sd, fn):
                try:
                    photos.append(np.asarray(getattr(sd, fn)()))
                except Exception:  # a sample that needs a download (pooch) is skipped
                    pass
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        photos.extend(np.asarray(im) for im in load_sample_images().images)
    except ImportError:
        pass
    photos = [p for p in photos if p.ndim == 3 and p.shape[2] == 3 and min(p.shape[:2]) >= 256]
    if not photos:
        raise RuntimeError("no sample photos: install scikit-image or scikit-learn (both bundle photos)")
    return photos


def write_jpeg_folder(root: str | os.PathLike, n: int, *, max_side: int = 500, seed: int = 0,
                      num_classes: int = 2) -> pathlib.Path:
    """Write `n` JPEGs as root/class_k/img_i.jpg: random crops of sample photos with sides between
    max_side / 2 and max_side (ImageNet-like at the default 500)."""
    from PIL import Image

    if n <= 0:
        raise ValueError(f"need a positive number of images, got {n}")
    root = pathlib.Path(root)
    rng = np.random.default_rng(seed)
    photos = _sample_photos()
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = (int(rng.integers(min(max_side // 2, s), min(max_side, s) + 1)) for s in (h, w))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = photo[y:y + ch, x:x + cw]
        d = root / f"class_{i % num_classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).save(d / f"img_{i:05d}.jpg", quality=90)
    return root


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def run_data(*, model: str, size: int, num_images: int, batch: int, workers: list[int], num_batches: int,
             max_side: int = 500, workdir: str | os.PathLike | None = None) -> dict[str, Any]:
    from bob_jax.backbones import zoo
    from bob_jax.data import pipelines, sources, transforms

    if model not in zoo.ZOO:
        raise ValueError(f"--data needs a zoo backbone for its preprocessing; {model!r} is not one")
    preprocess = zoo.ZOO[model].preprocess.replace(input_size=size)
    if any(k < 0 for k in workers):
        raise ValueError(f"worker counts must be >= 0, got {workers}")
    out: dict[str, Any] = {"model": model, "size": size, "num_images": num_images, "batch": batch,
                           "max_side": max_side, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        write_jpeg_folder(tmp, num_images, max_side=max_side)
        source = sources.get_source(f"folder:{tmp}")
        transform = transforms.TrainTransform(preprocess)
        rng = np.random.default_rng(0)
        source[0]  # PIL plugin set-up outside the clock
        t0 = time.perf_counter()
        decoded = [source[i] for i in range(len(source))]
        t_decode = time.perf_counter() - t0
        t0 = time.perf_counter()
        for el in decoded:
            transform.random_map(dict(el), rng)
        t_aug = time.perf_counter() - t0
        out["decode_img_s"] = _rate(len(decoded), t_decode)
        out["augment_img_s"] = _rate(len(decoded), t_aug)
        out["decode_augment_img_s_per_core"] = _rate(len(decoded), t_decode + t_aug)
        out["loader"] = []
        for k in workers:
            ds = pipelines.train_dataset(source, transform, batch, seed=0, num_workers=k)
            it = iter(ds)
            t0 = time.perf_counter()
            first = next(it)
            first_s = time.perf_counter() - t0
            if first["image"].dtype != np.uint8 or first["image"].shape != (batch, size, size, 3):
                raise AssertionError(f"loader batch {first['image'].dtype} {first['image'].shape}: expected "
                                     f"uint8 {(batch, size, size, 3)}")
            times = []
            for _ in range(num_batches):
                t0 = time.perf_counter()
                next(it)
                times.append(time.perf_counter() - t0)
            total = sum(times)
            out["loader"].append({
                "workers": k, "first_batch_s": first_s, "img_s": _rate(batch * num_batches, total),
                "median_batch_s": statistics.median(times) if times else None,
            })
            del it, ds
    base = next((r["img_s"] for r in out["loader"] if r["workers"] == min(workers)), None)
    for r in out["loader"]:
        r["scaling_vs_min_workers"] = r["img_s"] / base if base else None
    return out
