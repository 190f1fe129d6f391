"""Shared fixtures for the data tests: a tiny real tfds build and small real images."""

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_tfds_dir(tmp_path_factory):
    """`bob_tiny_digits` prepared as ArrayRecord once per session (offline, well under a second)."""
    from bob_jax.data.tiny_tfds import prepare_tiny_digits

    data_dir = tmp_path_factory.mktemp("tfds")
    prepare_tiny_digits(data_dir)
    return data_dir


@pytest.fixture(scope="session")
def sample_images():
    """Real photographs shipped with scikit-image / scikit-learn (uint8)."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    return {
        "chelsea": data.chelsea(),  # 300x451x3
        "coffee": data.coffee(),  # 400x600x3
        "camera": data.camera(),  # 512x512 grey
        "flower": load_sample_image("flower.jpg"),  # 427x640x3
    }


@pytest.fixture
def rng():
    return np.random.default_rng(0)
