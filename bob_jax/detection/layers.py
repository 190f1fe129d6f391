"""Layers and initialisers shared by the detection necks and heads.

Initialisers take an `nnx.Rngs` stream key like flax's (`init(key, shape, dtype)`). Drawn eagerly, they
use numpy seeded by the key's bits: eager `jax.random` compiles one computation per shape, about
0.2-2 s each on a 2-core CPU, which made building a detector take seconds per head. Under a trace
(`nnx.eval_shape`, `nnx.jit`) they fall back to `jax.random`: the same distribution, other draws.

- `uniform_init(bound)` / `normal_init(std)`: U(-bound, bound) / N(0, std^2).
- `msra_fill`: detectron2 `c2_msra_fill` on an HWIO conv kernel (He normal, fan-out: std sqrt(2 / (kh kw out))).
- `xavier_fill`: detectron2 `c2_xavier_fill` (kaiming_uniform a=1) on a [in, out] kernel: U(+-sqrt(3 / in)).
- `ConvTranspose2x2`: `torch.nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2)` on NHWC maps, with
  PyTorch's default init (the ViTDet pyramids) or detectron2's msra init (the mask head's deconv).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

CONVT_INITS = ("torch_default", "msra")


def _host_rng(key) -> np.random.Generator | None:
    """A numpy generator seeded by a concrete key's bits; None for a traced key."""
    if isinstance(key, jax.core.Tracer):
        return None
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def uniform(key, shape, bound: float, dtype=jnp.float32) -> jax.Array:
    """U(-bound, bound) of `shape` (see the module docstring for eager vs traced draws)."""
    rng = _host_rng(key)
    if rng is None:
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return jnp.asarray(rng.uniform(-bound, bound, shape), dtype)


def normal(key, shape, std: float, dtype=jnp.float32) -> jax.Array:
    """N(0, std^2) of `shape` (see the module docstring for eager vs traced draws)."""
    rng = _host_rng(key)
    if rng is None:
        return jax.random.normal(key, shape, dtype) * jnp.asarray(std, dtype)
    return jnp.asarray(rng.standard_normal(shape) * std, dtype)


def uniform_init(bound: float):
    return lambda key, shape, dtype=jnp.float32: uniform(key, shape, bound, dtype)


def normal_init(std: float):
    return lambda key, shape, dtype=jnp.float32: normal(key, shape, std, dtype)


def msra_fill(key, shape, dtype=jnp.float32) -> jax.Array:
    """`c2_msra_fill` for an HWIO conv kernel: normal with std sqrt(2 / (kh * kw * out))."""
    kh, kw, _, out = shape
    return normal(key, shape, math.sqrt(2.0 / (kh * kw * out)), dtype)


def xavier_fill(key, shape, dtype=jnp.float32) -> jax.Array:
    """`c2_xavier_fill` (kaiming_uniform a=1) for a [in, out] kernel: U(-sqrt(3 / in), sqrt(3 / in))."""
    return uniform(key, shape, math.sqrt(3.0 / shape[0]), dtype)


class ConvTranspose2x2(nnx.Module):
    """`torch.nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2, padding=0)` on NHWC maps.

    Stride equals kernel size, so every output pixel (2i + a, 2j + b) receives exactly one input pixel
    (i, j) through tap (a, b): an einsum and a reshape (no kernel flip: the windows do not overlap).
    `kernel[a, b, i, o]` is torch's `weight[i, o, a, b]`.

    init "torch_default": kernel and bias U(+-1/sqrt(fan_in)) with torch's fan_in of the [in, out, 2, 2]
    weight, out * 4; "msra": detectron2's `c2_msra_fill` (torch's fan_out of that weight, in * 4), bias 0.
    """

    def __init__(self, in_channels: int, out_channels: int, *, init: str = "torch_default", rngs: nnx.Rngs):
        shape = (2, 2, in_channels, out_channels)
        if init == "torch_default":
            bound = 1.0 / math.sqrt(out_channels * 4)
            self.kernel = nnx.Param(uniform(rngs.params(), shape, bound))
            self.bias = nnx.Param(uniform(rngs.params(), (out_channels,), bound))
        elif init == "msra":
            self.kernel = nnx.Param(normal(rngs.params(), shape, math.sqrt(2.0 / (in_channels * 4))))
            self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32))
        else:
            raise ValueError(f"init={init!r} is not supported; use one of {CONVT_INITS}")
        self.dtype = None  # compute dtype (backbones.set_compute_dtype); None: the parameters'

    def __call__(self, x):
        dtype = self.dtype or self.kernel[...].dtype
        b, h, w, _ = x.shape
        y = jnp.einsum("bhwi,acio->bhawco", x.astype(dtype), self.kernel[...].astype(dtype))
        return y.reshape(b, 2 * h, 2 * w, -1) + self.bias[...].astype(dtype)
