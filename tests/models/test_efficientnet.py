"""EfficientNet-Lite0 with its REAL ImageNet weights (offline package) vs timm `tf_efficientnet_lite0`."""

import numpy as np
import pytest

from bob_jax import backbones
from bob_jax.backbones.preprocess import normalize
from bob_jax.models.layers import DepthwiseConv2d
from bob_jax.testing import assert_parity
from bob_jax.testing.reference import require_reference

# ImageNet ids: 281 tabby, 282 tiger cat, 285 Egyptian cat, 967 espresso, 872 tripod.
EXPECTED_TOP1 = {"chelsea": {281, 282, 285}, "coffee": {967}, "camera": {872}}


def _photos():
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {n: getattr(skimage.data, n)() for n in ("chelsea", "coffee", "camera", "astronaut", "rocket")}
    for name, img in zip(("china", "flower"), load_sample_images().images):
        photos[name] = img
    return photos


@pytest.fixture(scope="module")
def lite0():
    return backbones.create("tf_efficientnet_lite0.offline", weights="pretrained")


@pytest.fixture(scope="module")
def timm_lite0(lite0):
    torch, timm = require_reference()
    from bob_jax.backbones import resolve_pretrained_file
    from bob_jax.backbones.zoo import ZOO
    from bob_jax.convert.efficientnet import effnet_pytorch_to_timm

    path = resolve_pretrained_file(ZOO["tf_efficientnet_lite0.offline"])
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(effnet_pytorch_to_timm(dict(sd)), strict=True)  # every shape equal, nothing left
    return model


@pytest.fixture(scope="module")
def photo_batch(lite0):
    from bob_jax.data.transforms import EvalTransform

    transform = EvalTransform(lite0.preprocess)
    photos = _photos()
    images = np.stack([transform.map({"image": img, "label": 0})["image"] for img in photos.values()])
    return list(photos), np.asarray(normalize(images, lite0.preprocess))


@pytest.mark.reference
def test_real_weights_match_timm_on_photos(lite0, timm_lite0, photo_batch):
    import torch

    names, x = photo_batch
    with torch.no_grad():
        want = timm_lite0(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    got = np.asarray(backbones.forward(lite0, x)["logits"])
    assert_parity(got, want, what="EfficientNet-Lite0 logits")
    for name, g, w in zip(names, got, want):
        assert list(np.argsort(-g)[:5]) == list(np.argsort(-w)[:5]), name


def test_real_weights_classify_photos(lite0, photo_batch):
    names, x = photo_batch
    logits = np.asarray(backbones.forward(lite0, x)["logits"])
    for name, row in zip(names, logits):
        if name in EXPECTED_TOP1:
            assert int(np.argmax(row)) in EXPECTED_TOP1[name], (name, np.argsort(-row)[:5])


def test_offline_weights_identity(lite0):
    assert lite0.weights_id.startswith("sha256:57934424")
    assert lite0.preprocess.mean == (0.5, 0.5, 0.5) and lite0.preprocess.crop_pct == 0.875


@pytest.mark.parametrize("stride,size,k", [(1, 9, 3), (2, 10, 5), (2, 9, 3)])
def test_depthwise_cpu_path_equals_grouped_conv(stride, size, k):
    import jax
    from flax import nnx

    conv = DepthwiseConv2d(6, k, stride=stride, padding="SAME", rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((2, size, size, 6)).astype(np.float32)
    want = jax.lax.conv_general_dilated(
        x, conv.kernel[...], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=6,
    )
    assert_parity(conv(x), want, tol=1e-6)
