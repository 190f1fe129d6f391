"""An embedded multi-label dataset: which of five shape classes appear in an image (CheXpert-style).

The images are the synthetic detection scenes of `bob_jax.detection.synthetic` (1-6 shapes of circle,
square, triangle, ellipse, star on textured backgrounds, occlusion allowed); the target of an image is
a float32 vector of 5 presence labels, 1.0 when at least one visible instance of the class is annotated.
Like CheXpert's five observations it is multi-label with unequal label frequencies, so the multi-label
probe (sigmoid BCE, mean AUROC) runs offline on real pixels. Image `i` depends only on (seed, i): the
train split is images 0..n_train-1, the test split the next n_test, so the splits never overlap.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SPLITS = ("train", "test")


class ShapesMultilabel:
    """`get_source("shapes", split)`: uint8 images with float32 [5] presence targets (`multilabel=True`)."""

    multilabel = True

    def __init__(self, split: str = "train", *, size: int = 64, train_size: int = 2000, test_size: int = 500,
                 seed: int = 0):
        from bob_jax.detection.synthetic import SHAPE_CLASSES

        if split not in SPLITS:
            raise ValueError(f"shapes: unknown split {split!r}; use one of {SPLITS}")
        if min(train_size, test_size) < 1:
            raise ValueError(f"shapes: train_size and test_size must be >= 1, got {train_size}, {test_size}")
        self.split, self.size, self.seed = split, int(size), int(seed)
        self.train_size, self.test_size = int(train_size), int(test_size)
        self.offset = 0 if split == "train" else self.train_size
        self.class_names = SHAPE_CLASSES
        self.num_classes = len(SHAPE_CLASSES)
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return self.train_size if self.split == "train" else self.test_size

    def _render(self, index: int):
        from bob_jax.detection.synthetic import render_scene

        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a source of {len(self)} examples")
        image, instances = render_scene(self.seed, self.offset + index, self.size)
        target = np.zeros(self.num_classes, np.float32)
        for cls, _mask in instances:
            target[cls] = 1.0
        return image, target

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, target = self._render(int(index))
        return {"image": image, "label": target}

    def labels(self) -> np.ndarray:
        """[N, 5] float32 targets (rendered once, then cached)."""
        if self._labels is None:
            self._labels = np.stack([self._render(i)[1] for i in range(len(self))])
        return self._labels.copy()

    def describe(self) -> dict[str, Any]:
        return {
            "name": "shapes",
            "split": self.split,
            "size": len(self),
            "num_classes": self.num_classes,
            "multilabel": True,
            "origin": {"generator": "bob_jax.detection.synthetic.render_scene", "seed": self.seed,
                       "image_size": self.size, "first_index": self.offset},
            "subset": None,
        }

    def __repr__(self) -> str:
        return f"ShapesMultilabel({self.split!r}, n={len(self)}, size={self.size}, seed={self.seed})"
