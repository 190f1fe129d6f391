"""ResNet-50 vs timm `resnet50`: logits, pooled features and every stage map, float32, 1e-4."""

import numpy as np
import pytest

from bob_jax import backbones
from bob_jax.convert import ConversionError
from bob_jax.testing import assert_parity, parity_error
from bob_jax.testing.reference import (
    check_output_scale,
    redraw_parameters,
    require_reference,
    state_dict_numpy,
)

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def timm_resnet50():
    torch, timm = require_reference()
    return {seed: redraw_parameters(timm.create_model("resnet50", pretrained=False).eval(), seed)
            for seed in (0, 1)}


@pytest.fixture(scope="module")
def flax_resnet50(timm_resnet50):
    return {seed: backbones.from_timm_state_dict("resnet50", state_dict_numpy(m))
            for seed, m in timm_resnet50.items()}


def _torch_outputs(model, x):
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        logits = model(xt).numpy()
        pooled = model.forward_head(model.forward_features(xt), pre_logits=True).numpy()
        stages = model.forward_intermediates(xt, intermediates_only=True)
    return logits, pooled, [s.numpy().transpose(0, 2, 3, 1) for s in stages]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("size", [64, 96])
def test_resnet50_matches_timm(timm_resnet50, flax_resnet50, seed, size):
    x = np.random.default_rng(seed + size).standard_normal((2, size, size, 3)).astype(np.float32)
    logits, pooled, stages = _torch_outputs(timm_resnet50[seed], x)
    check_output_scale(logits)
    out = backbones.forward(flax_resnet50[seed], x)
    assert_parity(out["logits"], logits, what="logits")
    assert_parity(out["pooled"], pooled, what="pooled")
    # timm's intermediates: act1 (stride 2) then layer1..4 (strides 4..32).
    for stage, stride in zip(stages, (2, 4, 8, 16, 32)):
        assert_parity(out["features"][stride], stage, what=f"stride {stride}")


def test_parity_test_can_fail(timm_resnet50):
    """Mutation test: perturbing one converted tensor must break parity."""
    sd = state_dict_numpy(timm_resnet50[0])
    sd["layer3.2.conv2.weight"] = sd["layer3.2.conv2.weight"] * 1.01
    mutated = backbones.from_timm_state_dict("resnet50", sd)
    x = np.random.default_rng(0).standard_normal((1, 64, 64, 3)).astype(np.float32)
    logits, _, _ = _torch_outputs(timm_resnet50[0], x)
    assert parity_error(backbones.forward(mutated, x)["logits"], logits) > 1e-4


def test_headless_and_global_pool_kwargs(timm_resnet50):
    import timm
    import torch

    ref = timm.create_model("resnet50", pretrained=False, num_classes=0, global_pool="max").eval()
    sd = {k: v for k, v in state_dict_numpy(timm_resnet50[1]).items() if not k.startswith("fc.")}
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    model = backbones.from_timm_state_dict("resnet50", sd, num_classes=0, global_pool="max")
    x = np.random.default_rng(3).standard_normal((2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    out = backbones.forward(model, x)
    assert "logits" not in out
    assert_parity(out["pooled"], want)


def test_conversion_reports_every_problem_at_once(timm_resnet50):
    sd = state_dict_numpy(timm_resnet50[0])
    del sd["layer1.0.bn1.running_var"]
    sd["layer2.0.conv1.weight"] = sd["layer2.0.conv1.weight"][:, :10]
    sd["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as e:
        backbones.from_timm_state_dict("resnet50", sd)
    msg = str(e.value)
    assert "layer1.0.bn1.var" in msg and "missing" in msg
    assert "layer2.0.conv1" in msg and "shape" in msg
    assert "extra.weight" in msg and "unexpected" in msg


def test_unsupported_kwarg_is_named():
    with pytest.raises(TypeError, match="img_size"):
        backbones.from_timm_state_dict("resnet50", {}, img_size=224)
