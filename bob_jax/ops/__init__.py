"""Fixed-shape, jit- and vmap-friendly detection ops on (x1, y1, x2, y2) boxes and NHWC feature maps.

``roi_align`` / ``multilevel_roi_align`` follow torchvision's RoIAlign (aligned / adaptive sampling) and
detectron2's FPN level assignment; ``nms`` / ``batched_nms`` follow torchvision's greedy NMS with outputs
padded to a static size; ``box_iou`` etc. follow torchvision.ops.
"""

from bob_jax.ops.boxes import box_area, box_iou, clip_boxes, generalized_box_iou
from bob_jax.ops.nms import batched_nms, nms
from bob_jax.ops.roi_align import assign_fpn_levels, multilevel_roi_align, roi_align

__all__ = [
    "assign_fpn_levels",
    "batched_nms",
    "box_area",
    "box_iou",
    "clip_boxes",
    "generalized_box_iou",
    "multilevel_roi_align",
    "nms",
    "roi_align",
]
