"""Input data for bob_jax: random-access sources, grain transforms, train/eval pipelines.

`sources` is cheap to import (numpy only; scikit-learn, tfds and PIL load lazily). `transforms` and
`pipelines` import grain at module level (their classes subclass grain's transforms), so keep them out
of the `bob_jax.backbones` import path.
"""
