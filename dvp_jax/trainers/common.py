"""Pieces every trainer uses: the model from config, data sizes, the k-NN monitor."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dvp_jax import config_checks, loop, optim, sharding
from dvp_jax.evaluators import knn
from dvp_jax.evaluators.data import EvalData
from dvp_jax.models.spec import ModelSpec


def feature_width(config) -> int:
    """C: the width of the backbone's 'pooled' feature for ``config.model`` (shape-only trace)."""
    backbone = ModelSpec.from_config(config.model).build()
    shapes = jax.eval_shape(lambda: backbone.init_with_output(
        jax.random.PRNGKey(0), dummy_images(config), train=False)[0])
    return int(shapes["pooled"].shape[-1])


@dataclasses.dataclass(frozen=True)
class DataSizes:
    """Sizes a trainer derives from the data and the config."""
    num_train: int
    num_classes: int
    steps_per_epoch: int
    total_steps: int


def data_sizes(config, mesh, split: str | None = None, num_epochs: float | None = None) -> DataSizes:
    """Checks the global batch against the mesh and derives epoch lengths (drop-last)."""
    from dvp_jax.input import pipeline, sources  # TensorFlow stays out of module import.
    sharding.check_global_batch(config.batch_size, mesh)
    info = sources.get_source(config.input).info(split or config.input.train_split)
    spe = pipeline.steps_per_epoch(info.num_examples, config.batch_size)
    epochs = config.num_epochs if num_epochs is None else num_epochs
    return DataSizes(info.num_examples, info.num_classes, spe, loop.total_steps_for(epochs, spe))


def eval_every_steps(config, steps_per_epoch: int) -> int:
    """``loop.eval_every_epochs`` in steps (0 = only at the end)."""
    epochs = config.loop.eval_every_epochs
    return max(1, int(round(epochs * steps_per_epoch))) if epochs > 0 else 0


def eval_data(config) -> EvalData:
    """Where the training loop's evaluations read: ``config.input`` at the training batch size
    (already checked to be a multiple of the device count)."""
    return EvalData(config.input, config.batch_size)


def knn_evaluator(config, model, variables_of: Callable[[Any], dict], mesh,
                  feature: str = "pooled", prefix: str = "knn") -> Callable[[Any], dict]:
    """state -> {'<prefix>_top1': %}: MoCo's weighted k-NN monitor (evaluators.knn.Knn: bank =
    input.train_split, queries = input.eval_split, centre crops).

    k = config.knn.k (200), weights exp(cos / config.knn.temperature) (0.1), features
    L2-normalised; ``variables_of(state)`` picks the encoder's variables from the state.
    """
    evaluator = knn.Knn(model, eval_data(config), config.input.eval_split,
                        config.input.train_split, mesh, feature=feature, k=config.knn.k,
                        temperature=config.knn.temperature, ks=(1,))

    def evaluate(state) -> dict:
        return {f"{prefix}_top1": evaluator(variables_of(state))["top1"]}

    return evaluate


def encoder_variables(state) -> dict:
    """The model variables every state carries at its top level."""
    return {"params": state["params"], "batch_stats": state["batch_stats"]}


def dummy_images(config, batch: int = 1) -> jax.Array:
    """Zeros [batch, S, S, 3] to initialise a model at the configured resolution."""
    s = config.input.image_size
    return jnp.zeros((batch, s, s, 3), jnp.float32)


def make_optimizer(config, sizes: DataSizes, optim_config=None):
    """(schedule, tx) from ``optim_config`` (default config.optim) over config.num_epochs."""
    oc = config.optim if optim_config is None else optim_config
    schedule = optim.make_schedule(oc, global_batch=config.batch_size,
                                   steps_per_epoch=sizes.steps_per_epoch,
                                   num_epochs=config.num_epochs)
    return schedule, optim.make_optimizer(oc, schedule)


def with_lr(train_step, schedule):
    """Adds the step's learning rate to the metrics."""
    def step_fn(state, batch):
        new_state, out = train_step(state, batch)
        return new_state, dict(out, lr=schedule(state["step"]))
    return step_fn


def train_batches_fn(config, transform: str, keys: tuple[str, ...] | None = None):
    """start_step -> the training iterator of ``config.input`` with ``transform``; ``keys``
    keeps only those entries of each batch (None: all)."""
    def train_batches(start_step: int):
        from dvp_jax.input import pipeline
        batches = pipeline.make_train_iterator(
            config.input, config.input.train_split, transform, global_batch=config.batch_size,
            seed=config.seed, start_step=start_step, image_size=config.input.image_size)
        if keys is None:
            return batches
        return ({k: b[k] for k in keys} for b in batches)
    return train_batches


def check_queue(key: str, queue_size: int, global_batch: int) -> None:
    """The ring buffer advances by whole global batches: K (config ``key``) must be a multiple."""
    config_checks.check_multiple(key, queue_size, "batch_size", global_batch,
                                 "the queue is written a whole global batch at a time")


def check_bn_groups(config, groups: int, key: str) -> None:
    """Every BN group must get the same number of images of the global batch."""
    if config.batch_size % groups:
        raise config_checks.ConfigError(
            f"config.batch_size={config.batch_size} is not divisible by the {groups} BN groups "
            f"(config.{key}).")


def enqueue(queue: jax.Array, ptr: jax.Array, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Ring-buffer write: (queue [K, ...] with ``rows`` [B, ...] at ptr, (ptr + B) % K).

    K is a multiple of B (``check_queue``), so a write never wraps."""
    start = (ptr,) + (0,) * (queue.ndim - 1)
    return (jax.lax.dynamic_update_slice(queue, rows.astype(queue.dtype), start),
            (ptr + rows.shape[0]) % queue.shape[0])
