"""Anchors of detectron2's `DefaultAnchorGenerator` (`detectron2/modeling/anchor_generator.py`).

Per level, the cell anchors are centred at (0, 0): for each size s (outer loop) and aspect ratio r = h / w
(inner loop), w = sqrt(s^2 / r), h = r * w, box (-w/2, -h/2, w/2, h/2). They are shifted to every grid
location (x * stride + offset * stride, y * stride + offset * stride) in row-major order (y outer, x
inner), so a level's anchors are [H * W * A, 4] in (y, x, anchor) order, the order in which the RPN head
flattens its NHWC outputs. Anchors depend only on static shapes, so they are NumPy constants computed in
float32 like detectron2 (Python-float cell anchors cast to float32, float32 shifts).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """[len(sizes) * len(aspect_ratios), 4] float32 anchors centred at 0 (detectron2 `generate_cell_anchors`)."""
    anchors = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return np.asarray(anchors, dtype=np.float32)


def grid_anchors(
    grid_size: tuple[int, int], stride: int, cells: np.ndarray, offset: float = 0.0
) -> np.ndarray:
    """[H * W * A, 4] float32: `cells` [A, 4] shifted to every location of an H x W grid, row-major."""
    height, width = grid_size
    shifts_x = np.arange(offset * stride, width * stride, step=stride, dtype=np.float32)
    shifts_y = np.arange(offset * stride, height * stride, step=stride, dtype=np.float32)
    shift_y, shift_x = np.meshgrid(shifts_y, shifts_x, indexing="ij")
    shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
    shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=1)
    return (shifts[:, None, :] + cells[None, :, :]).reshape(-1, 4)


@dataclasses.dataclass(frozen=True)
class AnchorGenerator:
    """detectron2 `DefaultAnchorGenerator`; the defaults are the FPN / ViTDet configs' (p2..p6)."""

    sizes: tuple[tuple[float, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    offset: float = 0.0

    def __post_init__(self):
        if len(self.sizes) != len(self.strides):
            raise ValueError(
                f"AnchorGenerator needs one size tuple per level: {len(self.sizes)} size tuples for "
                f"{len(self.strides)} strides; pass e.g. sizes=((32,), (64,), ...) with one entry per stride"
            )
        if not 0.0 <= self.offset < 1.0:
            raise ValueError(f"anchor offset must be in [0, 1), got {self.offset}")
        if len({len(s) for s in self.sizes}) != 1:
            raise ValueError(f"every level needs the same number of sizes (one RPN head), got {self.sizes}")

    @property
    def num_anchors(self) -> int:
        """Anchors per location (the RPN head's A), the same on every level."""
        return len(self.sizes[0]) * len(self.aspect_ratios)

    def __call__(self, grid_sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Per level [H_i * W_i * A, 4] float32 anchors for feature maps of spatial sizes `grid_sizes`."""
        if len(grid_sizes) != len(self.strides):
            raise ValueError(f"got {len(grid_sizes)} feature maps for {len(self.strides)} anchor levels")
        return [
            grid_anchors(tuple(grid), stride, cell_anchors(sizes, self.aspect_ratios), self.offset)
            for grid, stride, sizes in zip(grid_sizes, self.strides, self.sizes)
        ]
