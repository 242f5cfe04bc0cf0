"""``train_and_evaluate(config, workdir)``: the one library call behind ``dvp_jax.main``.

Dispatches on ``config.trainer`` through ``dvp_jax.registry.TRAINERS`` to a trainer module with
``train(config, workdir, mesh)``.
Importable from tests and notebooks.
"""
from __future__ import annotations

import importlib

from dvp_jax import config_checks, sharding
from dvp_jax.registry import TRAINERS  # config.trainer -> module with train(config, workdir, mesh).


def describe(config) -> str:
    """One line saying what the trainer config runs, e.g. 'moco trainer, resnet18, 20 epochs,
    batch 64, data digits'."""
    parts = [f"{config.trainer} trainer"]
    if "model" in config and "name" in config.model:
        parts.append(config.model.name)
    if "num_epochs" in config:
        parts.append(f"{config.num_epochs:g} epochs")
    if "batch_size" in config:
        parts.append(f"batch {config.batch_size}")
    if "input" in config and "source" in config.input:
        parts.append(f"data {config.input.source}")
    return ", ".join(parts)


def train_and_evaluate(config, workdir: str):
    """Validates ``config`` and runs its trainer in ``workdir`` over all devices."""
    config_checks.validate(config)
    module = importlib.import_module(TRAINERS[config.trainer])
    return module.train(config, workdir, sharding.make_mesh())
