"""Helpers for parity tests: re-drawing parameters at natural scales on the PyTorch side (torch is imported
lazily; needs the [reference] extra) and on the NNX side."""

from __future__ import annotations

import math
import os
import re

import numpy as np


def require_reference():
    """Import torch and timm for a reference test, or skip it; with BOB_JAX_REQUIRE_REFERENCE=1
    (CI) a missing or broken torch/timm fails the test instead, so a broken install never passes."""
    import pytest

    try:
        import timm
        import torch
    except Exception as e:  # pragma: no cover - depends on the install
        if os.environ.get("BOB_JAX_REQUIRE_REFERENCE") == "1":
            pytest.fail(f"reference tests are required but torch/timm do not import: {e!r}")
        pytest.skip(f"torch/timm not importable: {e!r}")
    # Parity is measured in true float32: no TF32 in cuDNN convs or matmuls.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch, timm


def redraw_leaves(model, seed: int, stds: dict[str, float] | None = None):
    """The NNX twin of `redraw_parameters`: every variable of `model` re-drawn with numpy, so that no code
    path hides behind a zero, unit or 1e-5 init. In leaf order (`bob_jax.convert.abstract_leaves`):
      norm scales / layer-scale gammas (`.scale`, `.gamma`): U(0.5, 1.5)
      paths matching a regex of `stds` (first match, in order): N(0, std^2)
      other biases (`.bias`): N(0, 0.1^2)
      everything else: N(0, 1 / fan_in) (fan_in = prod(shape[:-1]), NNX kernel layout)
    Returns the model with the new values (`bob_jax.convert.load_leaves`)."""
    from bob_jax.convert import abstract_leaves, load_leaves

    rng = np.random.default_rng(seed)
    rules = [(re.compile(k), v) for k, v in (stds or {}).items()]
    leaves = {}
    for path, v in abstract_leaves(model).items():
        shape = tuple(v.shape)
        std = next((s for pattern, s in rules if pattern.search(path)), None)
        if path.endswith((".scale", ".gamma")):
            leaves[path] = rng.uniform(0.5, 1.5, shape)
        elif std is not None:
            leaves[path] = rng.normal(0, std, shape)
        elif path.endswith(".bias"):
            leaves[path] = rng.normal(0, 0.1, shape)
        else:
            leaves[path] = rng.normal(0, 1 / math.sqrt(np.prod(shape[:-1])), shape)
    return load_leaves(model, {k: x.astype(np.float32) for k, x in leaves.items()})


def redraw_parameters(model, seed: int, overrides: dict[str, float] | None = None):
    """Re-draw every parameter and persistent float buffer of a torch model at random, keeping scales.

    timm's default init hides whole code paths from a parity test (zero-initialised last BatchNorm
    of each residual block, 1e-5 layer-scale gammas, zero biases): this helper replaces them with
    values of a natural scale so that every branch contributes.
      weights with ndim >= 2: N(0, 1 / fan_in) (fan_in = prod(shape[1:]), torch layout)
      1-D weights / gammas (norm scales, layer scale): U(0.5, 1.5)
      biases and running means: N(0, 0.1^2)
      running variances: U(0.5, 1.5) (kept positive)
    `overrides` maps a regex on the parameter name to a standard deviation used instead.
    Returns the model (modified in place).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    overrides = {re.compile(k): v for k, v in (overrides or {}).items()}

    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=gen) * (hi - lo) + lo

    with torch.no_grad():
        named = list(model.named_parameters()) + [
            (n, b) for n, b in model.named_buffers() if b.is_floating_point() and n in model.state_dict()
        ]
        for name, t in named:
            std = next((v for rx, v in overrides.items() if rx.fullmatch(name)), None)
            if std is not None:
                new = normal(t.shape, std)
            elif name.endswith("running_var"):
                new = uniform(t.shape, 0.5, 1.5)
            elif name.endswith("running_mean") or name.endswith("bias"):
                new = normal(t.shape, 0.1)
            elif t.ndim >= 2:
                new = normal(t.shape, 1.0 / math.sqrt(max(1, math.prod(t.shape[1:]))))
            else:
                new = uniform(t.shape, 0.5, 1.5)
            t.copy_(new.to(t.dtype))
    return model


def check_output_scale(output, lo: float = 0.1, hi: float = 100.0) -> float:
    """Assert the reference output has a sane spread, so a parity test cannot pass on ~0 or ~inf."""
    std = float(np.std(np.asarray(output, dtype=np.float64)))
    if not lo <= std <= hi:
        raise AssertionError(f"reference output std {std:.3g} outside [{lo}, {hi}]: re-draw scales are off")
    return std


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def torch_forward_nhwc(model, x_nhwc: np.ndarray):
    """Run a torch model on NHWC numpy input (transposed to NCHW), returning its raw output."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))


def account_against_timm(name: str, **arch_kwargs) -> int:
    """Key and shape accounting of bob_jax's `name` against timm's model built on the meta device.

    No tensor data is allocated on either side (timm on `meta`, bob_jax via `nnx.eval_shape`), so
    this takes seconds even for giant models. Raises ConversionError listing every problem; returns
    the number of tensors accounted.
    """
    import timm
    import torch

    from bob_jax.backbones import _abstract, _family, _split_name
    from bob_jax.convert import abstract_leaves, apply_rules, shape_stand_in

    arch, _ = _split_name(name)
    with torch.device("meta"):
        ref = timm.create_model(arch, pretrained=False, **arch_kwargs)
    state_dict = {k: shape_stand_in(v.shape) for k, v in ref.state_dict().items()}
    family = _family(arch)
    model = _abstract(family, arch, arch_kwargs)
    state_dict = family.to_timm_layout(state_dict)
    apply_rules(state_dict, family.timm_rules, abstract_leaves(model), source=f"timm {arch} (meta)", check_only=True)
    return len(state_dict)
