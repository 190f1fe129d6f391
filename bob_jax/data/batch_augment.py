"""Batch-level fine-tuning augmentations on the device (jax, jit-able, seeded by a jax PRNG key).

They act on normalised float NHWC batches, after `bob_jax.backbones.preprocess.normalize`, as in timm:

* `random_erasing`: timm `RandomErasing(probability, mode='pixel', max_count=1)`
  (timm/data/random_erasing.py), applied by timm to the normalised tensor (per image in the transform,
  or per batch in its CUDA prefetcher): the erased box gets N(0, 1) noise per pixel and channel, i.e.
  noise in normalised units.
* `mixup_cutmix`: timm `Mixup(mode='batch')` (timm/data/mixup.py): one lam per batch, mixing each image
  with the batch reversed; with probability `switch_prob` CutMix (a box pasted from the reversed batch,
  lam corrected to the pasted area) instead of Mixup; labels become label-smoothed soft targets
  `lam * y + (1 - lam) * y[::-1]`.

Order in the original runs: timm's train.py uses its prefetcher by default, so mixup/cutmix ran in
`FastCollateMixup` on the uint8 batch (mixup rounded to integers) before normalisation, and random
erasing ran after normalisation in the prefetcher: call `mixup_cutmix` then `random_erasing` to follow
it. Mixing normalised floats differs from that only by the uint8 rounding of mixup (<= 0.5 / 255 / std).
The CutMix box uses current timm's `cy + (cut + 1) // 2` lower/right edge; timm 0.6.12 used
`cy + cut // 2` (one row/column less for odd cuts; `legacy_cutmix_box=True`); `correct_lam` makes lam
follow the box either way.

Each op is split into a params function (every random draw, as arrays) and a pure apply function, so
tests can replay the exact draws through timm's own classes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = [
    "apply_mixup",
    "apply_random_erasing",
    "cutmix_box",
    "mixup_cutmix",
    "mixup_params",
    "mixup_target",
    "random_erasing",
    "random_erasing_params",
]

_ERASE_MODES = ("pixel", "rand", "const")


# --------------------------------------------------------------------------------------------------
# Random erasing
# --------------------------------------------------------------------------------------------------


def random_erasing_params(
    key: jax.Array,
    batch: int,
    height: int,
    width: int,
    *,
    probability: float = 0.25,
    area: tuple[float, float] = (0.02, 1 / 3),
    aspect: tuple[float, float | None] = (0.3, None),
    count: int = 1,
    attempts: int = 10,
) -> dict[str, jax.Array]:
    """All random draws of timm's `RandomErasing._erase` for a batch, and the boxes they give.

    Per image: erase with probability `probability`; per box (`count` boxes, area scaled by 1/count) up to
    `attempts` tries of target area ~ U(area) * H * W / count and aspect ratio exp(U(log a, log 1/a)),
    h = round(sqrt(area * ratio)), w = round(sqrt(area / ratio)); the first try with h < H and w < W
    wins (none: no box); top ~ U{0..H-h}, left ~ U{0..W-w}.
    Returns u_apply [B], u_area / u_ratio [B, count, attempts], apply [B], valid / top / left / h / w
    [B, count].
    """
    if not 0 <= probability <= 1:
        raise ValueError(f"random erasing probability must lie in [0, 1], got {probability}")
    if not 0 < area[0] <= area[1] <= 1:
        raise ValueError(f"random erasing area must satisfy 0 < min <= max <= 1, got {area}")
    if count < 1 or attempts < 1:
        raise ValueError(f"random erasing needs count >= 1 and attempts >= 1, got {count}, {attempts}")
    min_aspect, max_aspect = aspect[0], aspect[1] or 1 / aspect[0]
    if not 0 < min_aspect <= max_aspect:
        raise ValueError(f"random erasing aspect range must satisfy 0 < min <= max, got {aspect}")
    k_apply, k_area, k_ratio, k_top, k_left = jax.random.split(key, 5)
    u_apply = jax.random.uniform(k_apply, (batch,))
    u_area = jax.random.uniform(k_area, (batch, count, attempts))
    u_ratio = jax.random.uniform(k_ratio, (batch, count, attempts))
    target = (area[0] + (area[1] - area[0]) * u_area) * (height * width / count)
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)
    ratio = jnp.exp(log_lo + (log_hi - log_lo) * u_ratio)
    # jnp.round rounds half to even, like Python's round() in timm.
    hs = jnp.round(jnp.sqrt(target * ratio)).astype(jnp.int32)
    ws = jnp.round(jnp.sqrt(target / ratio)).astype(jnp.int32)
    ok = (ws < width) & (hs < height)
    first = jnp.argmax(ok, axis=-1)[..., None]
    h = jnp.take_along_axis(hs, first, -1)[..., 0]
    w = jnp.take_along_axis(ws, first, -1)[..., 0]
    valid = ok.any(-1)
    h, w = jnp.where(valid, h, 0), jnp.where(valid, w, 0)
    # randint(0, n) inclusive: floor(u * (n + 1)), kept <= n against float rounding at u -> 1.
    top = jnp.minimum(jnp.floor(jax.random.uniform(k_top, (batch, count)) * (height - h + 1)), height - h)
    left = jnp.minimum(jnp.floor(jax.random.uniform(k_left, (batch, count)) * (width - w + 1)), width - w)
    return {
        "u_apply": u_apply,
        "u_area": u_area,
        "u_ratio": u_ratio,
        # timm skips when random() > probability.
        "apply": u_apply <= probability,
        "valid": valid,
        "top": top.astype(jnp.int32),
        "left": left.astype(jnp.int32),
        "h": h,
        "w": w,
    }


def apply_random_erasing(images: jax.Array, params: dict[str, jax.Array], fill: jax.Array) -> jax.Array:
    """Write `fill` into the boxes of `params` (boxes in order, later ones on top). `fill`: per-pixel
    values [B, H, W, C] ('pixel'), per-box colours [B, count, C] ('rand'), or zeros ('const')."""
    _, height, width, _ = images.shape
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    out = images
    for c in range(params["top"].shape[1]):
        top, left = params["top"][:, c, None, None], params["left"][:, c, None, None]
        h, w = params["h"][:, c, None, None], params["w"][:, c, None, None]
        inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        inside = inside & (params["apply"] & params["valid"][:, c])[:, None, None]
        value = fill if fill.ndim == 4 else fill[:, c, None, None, :]
        out = jnp.where(inside[..., None], value.astype(out.dtype), out)
    return out


def random_erasing(
    key: jax.Array,
    images: jax.Array,
    *,
    probability: float = 0.25,
    mode: str = "pixel",
    area: tuple[float, float] = (0.02, 1 / 3),
    aspect: tuple[float, float | None] = (0.3, None),
    count: int = 1,
    return_params: bool = False,
):
    """timm `RandomErasing(probability, mode, min_area, max_area, min_aspect, max_count=count)` on a
    normalised float NHWC batch (jit-able; every argument but `key` / `images` static). Modes: 'pixel'
    (N(0, 1) per pixel and channel), 'rand' (one N(0, 1) colour per box), 'const' (zeros).
    Returns the erased batch, or with `return_params` (erased, params, fill) for logging and tests."""
    if mode not in _ERASE_MODES:
        raise ValueError(f"random erasing mode {mode!r} is not one of {_ERASE_MODES}")
    if images.ndim != 4:
        raise ValueError(f"random_erasing expects an NHWC batch, got shape {images.shape}")
    b, height, width, chans = images.shape
    k_params, k_fill = jax.random.split(key)
    params = random_erasing_params(
        k_params, b, height, width, probability=probability, area=area, aspect=aspect, count=count
    )
    if mode == "pixel":
        fill = jax.random.normal(k_fill, images.shape, jnp.float32)
    elif mode == "rand":
        fill = jax.random.normal(k_fill, (b, count, chans), jnp.float32)
    else:
        fill = jnp.zeros((b, count, chans), jnp.float32)
    out = apply_random_erasing(images, params, fill)
    return (out, params, fill) if return_params else out


# --------------------------------------------------------------------------------------------------
# Mixup / CutMix
# --------------------------------------------------------------------------------------------------


def mixup_params(
    key: jax.Array,
    height: int,
    width: int,
    *,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    correct_lam: bool = True,
    legacy_cutmix_box: bool = False,
) -> dict[str, jax.Array]:
    """timm `Mixup._params_per_batch` + `cutmix_bbox_and_lam` (`rand_bbox`, no minmax) for one batch.

    Draws: u_mix (mix when < prob), u_switch (CutMix when < switch_prob, if both alphas > 0),
    lam_raw ~ Beta(alpha, alpha) of the chosen method, box centre cy ~ U{0..H-1}, cx ~ U{0..W-1}.
    The box has cut = int(side * sqrt(1 - lam_raw)), spans [c - cut // 2, c + (cut + 1) // 2) clipped
    to the image (`legacy_cutmix_box`: [c - cut // 2, c + cut // 2), timm 0.6.12's box); with
    `correct_lam` the CutMix lam is 1 - box area / image area.
    Returns scalars: u_mix, u_switch, lam_raw, use_cutmix, cy, cx, yl, yh, xl, xh, lam (final, 1.0 when
    not mixing).
    """
    if mixup_alpha < 0 or cutmix_alpha < 0 or (mixup_alpha == 0 and cutmix_alpha == 0):
        raise ValueError(
            f"need mixup_alpha >= 0 and cutmix_alpha >= 0, one of them > 0; got {mixup_alpha}, {cutmix_alpha}"
        )
    if not 0 <= prob <= 1 or not 0 <= switch_prob <= 1:
        raise ValueError(f"prob and switch_prob must lie in [0, 1], got {prob}, {switch_prob}")
    k_mix, k_switch, k_mixup, k_cutmix, k_cy, k_cx = jax.random.split(key, 6)
    u_mix = jax.random.uniform(k_mix, ())
    u_switch = jax.random.uniform(k_switch, ())
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = u_switch < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    # Beta(0, 0) is undefined: a disabled method's draw is never selected, so give it a dummy alpha.
    lam_mixup = jax.random.beta(k_mixup, mixup_alpha or 1.0, mixup_alpha or 1.0)
    lam_cutmix = jax.random.beta(k_cutmix, cutmix_alpha or 1.0, cutmix_alpha or 1.0)
    lam_raw = jnp.where(use_cutmix, lam_cutmix, lam_mixup)
    mixing = u_mix < prob
    use_cutmix = use_cutmix & mixing
    cy = jax.random.randint(k_cy, (), 0, height)
    cx = jax.random.randint(k_cx, (), 0, width)
    yl, yh, xl, xh = cutmix_box(lam_raw, cy, cx, height, width, legacy=legacy_cutmix_box)
    lam_box = 1.0 - ((yh - yl) * (xh - xl)).astype(jnp.float32) / float(height * width)
    lam_cut = lam_box if correct_lam else lam_raw
    lam = jnp.where(mixing, jnp.where(use_cutmix, lam_cut, lam_raw), 1.0)
    return {
        "u_mix": u_mix,
        "u_switch": u_switch,
        "lam_raw": lam_raw,
        "use_cutmix": use_cutmix,
        "cy": cy,
        "cx": cx,
        "yl": yl,
        "yh": yh,
        "xl": xl,
        "xh": xh,
        "lam": lam.astype(jnp.float32),
    }


def cutmix_box(lam, cy, cx, height: int, width: int, *, legacy: bool = False):
    """timm `rand_bbox` for a given lam and centre: cut = int(side * sqrt(1 - lam)); rows
    [cy - cut // 2, cy + (cut + 1) // 2) (legacy, timm 0.6.12: cy + cut // 2) clipped to the image, same
    for columns. Returns (yl, yh, xl, xh)."""
    ratio = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    up = 0 if legacy else 1
    yl, yh = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + (cut_h + up) // 2, 0, height)
    xl, xh = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + (cut_w + up) // 2, 0, width)
    return yl, yh, xl, xh


def mixup_target(labels: jax.Array, num_classes: int, lam, smoothing: float = 0.1) -> jax.Array:
    """timm `mixup_target`: label-smoothed one-hot (off = smoothing / K, on = 1 - smoothing + off),
    mixed with the reversed batch: lam * y + (1 - lam) * y[::-1]."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (on - off) + off
    return y * lam + y[::-1] * (1.0 - lam)


def apply_mixup(
    images: jax.Array,
    labels: jax.Array,
    params: dict[str, jax.Array],
    num_classes: int,
    label_smoothing: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """Mix a normalised NHWC batch with its reverse by `params` (from `mixup_params`); returns the mixed
    images and soft targets [B, num_classes]."""
    _, height, width, _ = images.shape
    flipped = images[::-1]
    lam = params["lam"]
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    box = (rows >= params["yl"]) & (rows < params["yh"]) & (cols >= params["xl"]) & (cols < params["xh"])
    cut = jnp.where(box[None, :, :, None], flipped, images)
    mixed = images * lam.astype(images.dtype) + flipped * (1.0 - lam).astype(images.dtype)
    out = jnp.where(params["use_cutmix"], cut, mixed)
    # lam == 1 (no mixing): timm returns the batch untouched.
    out = jnp.where(lam == 1.0, images, out)
    return out, mixup_target(labels, num_classes, lam, label_smoothing)


def mixup_cutmix(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    num_classes: int,
    *,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
    correct_lam: bool = True,
    legacy_cutmix_box: bool = False,
    return_params: bool = False,
):
    """timm `Mixup(mixup_alpha, cutmix_alpha, prob, switch_prob, mode='batch', correct_lam,
    label_smoothing, num_classes)(images, labels)` on a normalised float NHWC batch with int labels;
    jit-able (all but key / images / labels static). The batch size must be even, as timm asserts.
    Returns (mixed images, soft targets [B, num_classes]), and the `mixup_params` dict as a third item
    with `return_params`."""
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f"need NHWC images and [B] labels, got {images.shape} and {labels.shape}")
    if images.shape[0] % 2:
        raise ValueError(f"mixup/cutmix needs an even batch size (timm asserts it), got {images.shape[0]}")
    params = mixup_params(
        key,
        images.shape[1],
        images.shape[2],
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        prob=prob,
        switch_prob=switch_prob,
        correct_lam=correct_lam,
        legacy_cutmix_box=legacy_cutmix_box,
    )
    out, targets = apply_mixup(images, labels, params, num_classes, label_smoothing)
    return (out, targets, params) if return_params else (out, targets)
