"""Detection and instance segmentation (issue 6): Mask R-CNN and Cascade Mask R-CNN on every backbone.

Modules (fixed-shape, jit-compiled; generic box/RoI ops live in ``bob_jax.ops``):

* ``box_coder`` -- detectron2 ``Box2BoxTransform`` deltas (dx, dy, dw, dh) with per-stage weights;
* ``anchors`` -- anchor generator (sizes 32..512 on p2..p6, ratios 0.5/1/2, offset 0);
* ``matcher`` -- IoU matcher with low-quality matches and positive/negative sampling;
* ``rpn`` -- RPN head, losses and proposals (per-level top-k, NMS, post-NMS top-k);
* ``roi_heads`` -- box head (4conv1fc), mask head (28x28), Cascade stages and their losses;
* ``postprocess`` -- test-time scoring, per-class NMS, mask pasting;
* ``necks`` -- FPN for hierarchical backbones; ``vitdet`` -- ViTDet backbone adaptation and simple pyramid;
  ``eva02det`` -- EVA-02's own ViTDet trunk (RoPE, SwiGLU, p14to16) from a zoo EVA-02;
* ``data`` -- COCO-format loading, large-scale jitter / multi-scale resize; ``synthetic`` -- the embedded
  procedurally drawn dataset and its domain-shifted twin; ``coco_eval`` -- pycocotools bbox/segm AP;
* ``layers`` -- the ConvTranspose2x2 and initialisers the necks and heads share;
* ``model`` -- `Detector` (trunk + neck + RPN + RoI heads: Mask R-CNN, Cascade (Mask) R-CNN);
* ``train`` -- AdamW schedule, frozen/fine-tuned protocols, jitted train step, COCO evaluation;
* ``job`` -- `config.job = "detection"`: train, evaluate (test set, shifted set), write records.

Conventions: NHWC images padded to a fixed square size with ``image_sizes`` [B, 2] (h, w); boxes
(x1, y1, x2, y2) float32 in input pixels; ground truth padded to G instances with class -1 as padding;
classifier logits with background last (index C); pyramid maps "p2".."p6" at strides 4..64.
"""
