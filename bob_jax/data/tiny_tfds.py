"""A tiny, real tensorflow-datasets builder for tests and demos: `bob_tiny_digits`.

It turns scikit-learn's bundled digits (see `sources.Digits`) into a tfds dataset that prepares offline
in well under a second, so the tfds -> ArrayRecord -> `tfds.data_source` -> grain path can be tested
without TensorFlow or downloads. Images are the 8x8 digits scaled to uint8 and enlarged 2x by pixel
repetition (16x16x1); example `i` of split `s` is example `i` of `Digits(s)`.

The builder lives in a package module on purpose: tfds inspects the builder's code directory and fails
for builders defined in `__main__`. Examples are yielded as PNG bytes because tfds encodes numpy
images through `tf.image` (TensorFlow is not installed).

    from bob_jax.data.tiny_tfds import prepare_tiny_digits
    prepare_tiny_digits(data_dir)          # builds ArrayRecord files under data_dir
    get_source("tfds:bob_tiny_digits", "train", data_dir=data_dir)
"""

from __future__ import annotations

import io
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

TRAIN_SIZE = 240
TEST_SIZE = 60
SCALE = 2


def tiny_digit_image(image8: np.ndarray) -> np.ndarray:
    """The 16x16x1 image that the builder stores for an 8x8 uint8 digit."""
    return np.repeat(np.repeat(image8, SCALE, axis=0), SCALE, axis=1)[..., None]


class BobTinyDigits(tfds.core.GeneratorBasedBuilder):
    """First 240 train / 60 test examples of the fixed sklearn-digits split, 16x16 grey PNGs."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    # tfds 4.9.10's default `code_path` touches `importlib_resources`, which newer etils (1.15) no
    # longer installs (tensorflow/datasets#11212), so preparing any dataset fails with
    # ModuleNotFoundError. This module is a plain file, so its own path is the right answer.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="scikit-learn digits (UCI optdigits copy), 2x enlarged, for bob_jax tests.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8 * SCALE, 8 * SCALE, 1)),
                    "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
                    "index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            # Keep generation order (tfds otherwise shuffles by key hash), so example i is Digits(split)[i].
            disable_shuffling=True,
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ships with scikit-learn
        return {
            "train": self._generate_examples("train", TRAIN_SIZE),
            "test": self._generate_examples("test", TEST_SIZE),
        }

    def _generate_examples(self, split: str, n: int):
        from PIL import Image

        from bob_jax.data.sources import Digits

        digits = Digits(split)
        for i in range(n):
            ex = digits[i]
            buf = io.BytesIO()
            Image.fromarray(tiny_digit_image(ex["image"])[..., 0], mode="L").save(buf, format="PNG")
            yield i, {"image": buf.getvalue(), "label": int(ex["label"]), "index": i}


def prepare_tiny_digits(data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
    """Build `bob_tiny_digits` as ArrayRecord under `data_dir` (offline, < 1 s) and return the builder."""
    builder = BobTinyDigits(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder
