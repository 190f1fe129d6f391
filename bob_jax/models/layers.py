"""PyTorch-compatible building blocks with every numerical convention written out.

Convolutions take explicit padding tuples (PyTorch pads symmetrically; XLA's 'SAME' pads the
bottom/right more for stride 2 on even inputs and is only right for TF-ported weights), BatchNorm
uses PyTorch's momentum and epsilon with a two-pass variance, and pooling pads with -inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def torch_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> tuple[tuple[int, int], ...]:
    """The symmetric padding timm's `get_padding` gives: ((stride - 1) + dilation * (k - 1)) // 2."""
    p = ((stride - 1) + dilation * (kernel_size - 1)) // 2
    return ((p, p), (p, p))


def conv2d(in_ch, out_ch, kernel_size, *, stride=1, padding, groups=1, bias=False, rngs) -> nnx.Conv:
    """A `torch.nn.Conv2d` twin (NHWC activations, HWIO kernel), with padding always explicit."""
    return nnx.Conv(
        in_ch,
        out_ch,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=padding,
        feature_group_count=groups,
        use_bias=bias,
        rngs=rngs,
    )


def batch_norm(num_features: int, *, eps: float = 1e-5, rngs) -> nnx.BatchNorm:
    """`torch.nn.BatchNorm2d` semantics: momentum 0.1 (flax 0.9), exact two-pass variance, eval mode."""
    return nnx.BatchNorm(
        num_features,
        use_running_average=True,
        momentum=0.9,
        epsilon=eps,
        use_fast_variance=False,
        rngs=rngs,
    )


def linear(in_features: int, out_features: int, *, bias: bool = True, rngs) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, use_bias=bias, rngs=rngs)


def max_pool(x, kernel_size: int, stride: int, padding: int):
    """`nn.MaxPool2d(k, s, p)` on NHWC: padded positions are -inf, so they never win."""
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, kernel_size, kernel_size, 1), (1, stride, stride, 1), pads
    )


def global_pool(x, pool_type: str = "avg"):
    """timm's `SelectAdaptivePool2d` flattened: NHWC map -> [B, C] (or [B, 2C] for 'catavgmax')."""
    if pool_type == "avg":
        return jnp.mean(x, axis=(1, 2))
    if pool_type == "max":
        return jnp.max(x, axis=(1, 2))
    if pool_type == "avgmax":
        return 0.5 * (jnp.mean(x, axis=(1, 2)) + jnp.max(x, axis=(1, 2)))
    if pool_type == "catavgmax":
        return jnp.concatenate([jnp.mean(x, axis=(1, 2)), jnp.max(x, axis=(1, 2))], axis=-1)
    raise ValueError(f"global_pool={pool_type!r} is not supported; use 'avg', 'max', 'avgmax' or 'catavgmax'")


POOL_DIM_FACTOR = {"avg": 1, "max": 1, "avgmax": 1, "catavgmax": 2}
