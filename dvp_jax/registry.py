"""Registries: names a config may use, mapped to the module that implements them.

A leaf module (imports nothing of dvp_jax): ``config_checks`` reads the allowed names here and
``train`` and ``main`` dispatch through it, so none of them imports another for a list of names.
"""

# config.trainer -> module with train(config, workdir, mesh): one training run.
TRAINERS = {
    "moco": "dvp_jax.trainers.moco",
    "seed_distill": "dvp_jax.trainers.seed_distill",
    "supervised": "dvp_jax.trainers.classify",
    "linear": "dvp_jax.trainers.classify",
    "finetune": "dvp_jax.trainers.classify",
    "distill": "dvp_jax.trainers.distill",
}

# config.experiment -> module with run(config, workdir) and describe(config): an experiment runs
# several trainings, each through ``train.train_and_evaluate``. A config has either 'trainer'
# or 'experiment'.
EXPERIMENTS = {
    "table1": "dvp_jax.table1",
}
