"""Evaluations of a model's variables: used by the training loop and by dvp_jax.evaluate."""
