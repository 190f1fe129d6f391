"""Absolute position-embedding resampling, reproducing PyTorch's `F.interpolate` exactly.

timm resamples a checkpoint's `pos_embed` grid to the model's grid with
`resample_abs_pos_embed(..., interpolation='bicubic', antialias=True, align_corners=False)`
(`checkpoint_filter_fn`; DINOv2 weights are stored on a 37x37 grid for 518 px inputs). Resizing is
linear and separable, so it is written here as two interpolation matrices built in numpy from
PyTorch's own index/weight formulas, applied as `W_h @ grid @ W_w^T`:

- `antialias=True` (PyTorch `_upsample_bicubic2d_aa`, Pillow-style): filter
  `cubic(x)` with a = -0.5, support 2 * scale when downsampling (filter stretched by the scale),
  2 when upsampling, taps clipped to the input and their weights renormalised to sum to one.
- `antialias=False` (PyTorch `upsample_bicubic2d`): Keys cubic convolution with A = -0.75,
  source coordinate `(dst + 0.5) * in/out - 0.5`, border taps clamped to the edge.

The matrices are numpy float64 (exact up to float rounding); `resample_abs_pos_embed` works on
numpy or JAX arrays, so the same code serves the converter and an in-graph dynamic resize.
"""

from __future__ import annotations

import functools
import math

import numpy as np


def _cubic_aa(x: np.ndarray) -> np.ndarray:
    """PyTorch `HelperInterpCubic::aa_filter` (a = -0.5, as Pillow)."""
    a = -0.5
    x = np.abs(x)
    return np.where(
        x < 1.0,
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
        np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0),
    )


def _cubic_keys(t: float, a: float = -0.75) -> tuple[float, float, float, float]:
    """PyTorch `get_cubic_upsample_coefficients` for taps at offsets -1, 0, 1, 2 (A = -0.75)."""

    def c1(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def c2(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)


@functools.lru_cache(maxsize=64)
def interpolation_matrix(in_size: int, out_size: int, antialias: bool = True) -> np.ndarray:
    """[out_size, in_size] float64 matrix M with `resized = M @ signal` (bicubic, align_corners=False)."""
    m = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    if antialias:
        support = 2.0 * scale if scale >= 1.0 else 2.0
        invscale = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(out_size):
            center = scale * (i + 0.5)
            xmin = max(int(center - support + 0.5), 0)
            xmax = min(int(center + support + 0.5), in_size)
            j = np.arange(xmin, xmax)
            w = _cubic_aa((j - center + 0.5) * invscale)
            total = w.sum()
            if total != 0.0:
                w = w / total
            m[i, xmin:xmax] = w
        return m
    for i in range(out_size):
        src = (i + 0.5) * scale - 0.5
        x0 = math.floor(src)
        t = src - x0
        for off, w in zip((-1, 0, 1, 2), _cubic_keys(t)):
            m[i, min(max(x0 + off, 0), in_size - 1)] += w
    return m


def resample_grid(grid, new_size: tuple[int, int], *, antialias: bool = True):
    """Resize a [H, W, C] (or [B, H, W, C]) grid to `new_size` like PyTorch bicubic interpolation."""
    h, w = grid.shape[-3], grid.shape[-2]
    mh = interpolation_matrix(h, new_size[0], antialias)
    mw = interpolation_matrix(w, new_size[1], antialias)
    if isinstance(grid, np.ndarray):
        out = np.einsum("ah,...hwc,bw->...abc", mh, grid.astype(np.float64), mw)
        return out.astype(grid.dtype)
    import jax.numpy as jnp

    return jnp.einsum(
        "ah,...hwc,bw->...abc", jnp.asarray(mh, grid.dtype), grid, jnp.asarray(mw, grid.dtype),
        precision="highest",
    )


def resample_abs_pos_embed(
    posemb,
    new_size: tuple[int, int],
    old_size: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    *,
    antialias: bool = True,
):
    """timm `resample_abs_pos_embed` (bicubic, align_corners=False): `posemb` [1, prefix + H*W, C]."""
    n = posemb.shape[1]
    if old_size is None:
        hw = int(math.sqrt(n - num_prefix_tokens))
        old_size = (hw, hw)
    old_size, new_size = tuple(old_size), tuple(new_size)
    if old_size[0] * old_size[1] + num_prefix_tokens != n:
        raise ValueError(f"pos_embed has {n} tokens, not {num_prefix_tokens} prefix + grid {old_size}")
    if old_size == new_size:
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    c = posemb.shape[-1]
    grid = resample_grid(grid.reshape(1, old_size[0], old_size[1], c), new_size, antialias=antialias)
    grid = grid.reshape(1, new_size[0] * new_size[1], c)
    if num_prefix_tokens == 0:
        return grid
    if isinstance(posemb, np.ndarray):
        return np.concatenate([prefix, grid], axis=1)
    import jax.numpy as jnp

    return jnp.concatenate([prefix, grid], axis=1)
