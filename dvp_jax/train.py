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
    """One line saying what ``config`` runs, e.g. 'pipeline: stages supervised, moco, linear,
    finetune, distill x seeds 0, 1, 2' or 'moco trainer, resnet18, 20 epochs, batch 64'."""
    if config.trainer == "pipeline":
        from dvp_jax import pipeline
        stages = [s for s in pipeline.STAGES if s not in config.get("skip_stages", ())]
        seeds = ", ".join(str(s) for s in config.seeds)
        return f"pipeline (Table 1): stages {', '.join(stages)} x seeds {seeds}"
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
