"""Input data for bob_jax: random-access sources, grain transforms, train/eval pipelines.

Modules: `sources` (Fashion-MNIST, digits, tfds ArrayRecord, image folders, seeded subsets),
`transforms` (eval and train transforms), `augment` (timm's RandAugment, colour jitter, the
fine-tuning train transform), `batch_augment` (random erasing and mixup/cutmix on device, jax),
`corruptions` (seeded ImageNet-C-style shifts for offline OOD), `pipelines` (grain loaders),
`tiny_tfds` (a small ArrayRecord builder for tests), `imagenet_ood_classes` (ImageNet-A/R lists),
`datasets` (the benchmark's named datasets: pinned splits, few-shot rules, preparation steps).

`sources` is cheap to import (numpy only; scikit-learn, tfds and PIL load lazily). `transforms` and
`pipelines` import grain at module level (their classes subclass grain's transforms), so keep them out
of the `bob_jax.backbones` import path.
"""
