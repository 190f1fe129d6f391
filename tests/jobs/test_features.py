"""Frozen-feature extraction: order, padding, mesh independence and the on-disk cache."""

import jax
import numpy as np

from bob_jax import backbones, parallel
from bob_jax.data.sources import get_source, seeded_subset
from bob_jax.features import extract_features


def test_features_once_cached_and_mesh_independent(tmp_path):
    model = backbones.create("tf_efficientnet_lite0.offline", weights="pretrained", num_classes=0)
    pre = model.preprocess.replace(input_size=32)
    source = seeded_subset(get_source("digits", "test"), 37, seed=0)  # 37: the last batch is padded
    kw = dict(preprocess=pre, batch_size=16, progress=False)
    one = extract_features(model, source, mesh=parallel.make_mesh(devices=jax.devices()[:1]), cache_dir=tmp_path, **kw)
    assert one.features.shape == (37, 1280) and not one.cached
    np.testing.assert_array_equal(one.labels, source.labels())
    eight = extract_features(model, source, mesh=parallel.make_mesh(), **kw)  # 8 simulated devices
    np.testing.assert_allclose(eight.features, one.features, rtol=1e-5, atol=1e-5)
    again = extract_features(model, source, cache_dir=tmp_path, **kw)
    assert again.cached and again.key == one.key
    np.testing.assert_array_equal(again.features, one.features)
    # Another preprocessing or other weights is another cache entry.
    other = extract_features(model, source, cache_dir=tmp_path, **{**kw, "preprocess": pre.replace(input_size=40)})
    assert not other.cached and other.key != one.key
