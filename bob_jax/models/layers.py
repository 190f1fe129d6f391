"""PyTorch-compatible building blocks with every numerical convention written out.

Convolutions take explicit padding tuples (PyTorch pads symmetrically; XLA's 'SAME' pads the
bottom/right more for stride 2 on even inputs and is only right for TF-ported weights), BatchNorm
uses PyTorch's momentum and epsilon with a two-pass variance, and pooling pads with -inf.
`DropPath` is timm's stochastic depth, stateless: its randomness is a key passed to the forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def to_2tuple(v) -> tuple[int, int]:
    """An int or a pair (timm's `to_2tuple` for sizes): (v, v) or (v[0], v[1]) as ints."""
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


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


def _same_pads(size: int, k: int, stride: int) -> tuple[int, int]:
    """TF/XLA 'SAME' padding for one spatial dim (the extra pixel goes to the bottom/right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


class DepthwiseConv2d(nnx.Module):
    """Depthwise conv (`groups == channels`), HWIO kernel `[k, k, 1, C]` like `nnx.Conv`'s layout.

    XLA:CPU lowers grouped convolutions to a slow generic loop (measured 1.0 s vs 0.09 s for a
    64x56x56x96 3x3 map), so on CPU this sums k*k shifted, strided slices times the per-channel
    taps; other backends use `lax.conv_general_dilated` with `feature_group_count` (cuDNN/TPU
    kernels). Both compute the same cross-correlation.
    """

    def __init__(self, channels: int, kernel_size: int, *, stride: int = 1, padding, rngs: nnx.Rngs):
        self.kernel = nnx.Param(
            nnx.initializers.lecun_normal()(rngs.params(), (kernel_size, kernel_size, 1, channels))
        )
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def _pads(self, h: int, w: int):
        if self.padding == "SAME":
            return _same_pads(h, self.kernel_size, self.stride), _same_pads(w, self.kernel_size, self.stride)
        return tuple(self.padding)

    def __call__(self, x):
        k, s = self.kernel_size, self.stride
        (pt, pb), (pl, pr) = self._pads(x.shape[1], x.shape[2])
        kernel = self.kernel[...].astype(x.dtype)
        if jax.default_backend() != "cpu":
            return jax.lax.conv_general_dilated(
                x, kernel, (s, s), ((pt, pb), (pl, pr)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
            )
        xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
        ho = (x.shape[1] + pt + pb - k) // s + 1
        wo = (x.shape[2] + pl + pr - k) // s + 1
        out = None
        for i in range(k):
            for j in range(k):
                tap = xp[:, i : i + s * (ho - 1) + 1 : s, j : j + s * (wo - 1) + 1 : s, :] * kernel[i, j, 0]
                out = tap if out is None else out + tap
        return out


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


def layer_norm(dim: int, *, eps: float, rngs) -> nnx.LayerNorm:
    """`torch.nn.LayerNorm` semantics: the source's epsilon (timm 1e-6, torch 1e-5), exact two-pass
    variance (flax's fast variance differs on small-spread inputs)."""
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)


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


def drop_path_rates(rate: float, n: int) -> tuple[float, ...]:
    """timm's stochastic-depth decay rule: `n` per-block rates spaced linearly from 0 to `rate`
    (`torch.linspace(0, rate, n)`; timm computes it in float32, so its values differ in the 8th digit)."""
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"drop_path_rate must lie in [0, 1], got {rate}")
    if n == 1:
        return (0.0,)
    return tuple(rate * i / (n - 1) for i in range(n))


def drop_path_or_none(rate: float, stream: int) -> DropPath | None:
    """A `DropPath` for a positive rate, else None (timm puts an Identity there)."""
    return DropPath(rate, stream) if rate > 0 else None


def dropout_key(rngs: nnx.Rngs | None) -> jax.Array | None:
    """The one key a forward pass draws for all its DropPaths: from the `dropout` stream of `rngs`."""
    return None if rngs is None else rngs.dropout()


def uses_drop_path(model: nnx.Module) -> bool:
    """True when some `DropPath` of `model` has a positive rate: its train-mode forward needs `rngs`."""
    return any(isinstance(m, DropPath) and m.rate > 0 for _, m in nnx.iter_modules(model))


class DropPath(nnx.Module):
    """Stochastic depth on a residual branch: timm `DropPath(drop_prob=rate, scale_by_keep=True)`.

    In train mode (`model.train()` sets `deterministic=False`) with rate > 0, each sample's branch is
    kept with probability 1 - rate and then scaled by 1 / (1 - rate) (zero when rate is 1, as timm);
    in eval mode (the default, `model.eval()`) or at rate 0 it is the identity.

    The module holds no variables, so a model's parameters and checkpoints do not depend on the
    rate. Randomness is pure: the forward takes `rngs=nnx.Rngs(dropout=key)`, draws one key from it
    (`dropout_key`) and hands it to every block; each DropPath folds in its own `stream` (an index
    unique within the model), so its mask depends only on that key, never on call order or state.
    """

    def __init__(self, rate: float, stream: int):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"DropPath rate must lie in [0, 1], got {rate}")
        self.rate = float(rate)
        self.stream = int(stream)
        self.deterministic = True

    def __call__(self, x, key: jax.Array | None):
        if self.deterministic or self.rate == 0.0:
            return x
        if key is None:
            raise ValueError(
                "DropPath is in train mode but the forward got no key: call the model with "
                "rngs=nnx.Rngs(dropout=key), or use model.eval(), or create it with drop_path_rate=0"
            )
        keep = 1.0 - self.rate
        per_sample = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(jax.random.fold_in(key, self.stream), keep, per_sample)
        scale = mask.astype(x.dtype)
        if keep > 0.0:
            scale = scale / jnp.asarray(keep, x.dtype)
        return x * scale
