"""Registries: names a config may use, mapped to the module that implements them.

A leaf module (imports nothing of dvp_jax): ``config_checks`` reads the allowed names here,
``train`` dispatches through it, and the Table-1 runner (``dvp_jax.pipeline``) runs its stages
through it, so none of them imports another for a list of names.
"""

# config.trainer -> module with train(config, workdir, mesh).
TRAINERS = {
    "moco": "dvp_jax.trainers.moco",
    "seed": "dvp_jax.trainers.seed",
    "supervised": "dvp_jax.trainers.classify",
    "linear": "dvp_jax.trainers.classify",
    "finetune": "dvp_jax.trainers.classify",
    "distill": "dvp_jax.trainers.distill",
    "pipeline": "dvp_jax.pipeline",
}
