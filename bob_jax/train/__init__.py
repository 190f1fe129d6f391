"""Training utilities shared by the BoB task recipes: optimisers and learning-rate schedules."""

from bob_jax.train.optim import mae_lars, optax_lars, scaled_lr, warmup_cosine, weight_matrix_mask

__all__ = ["mae_lars", "optax_lars", "scaled_lr", "warmup_cosine", "weight_matrix_mask"]
