"""Pieces every trainer uses: the model from config, data sizes, the k-NN monitor."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dvp_jax import features, loop, metrics, models, sharding


def model_kwargs(model_config, **extra) -> dict:
    """JSON-able ``models.build`` kwargs from ``config.model`` plus trainer extras."""
    kwargs = dict(name=model_config.name, small_stem=bool(model_config.small_stem),
                  width_multiplier=float(model_config.width_multiplier),
                  dtype=str(model_config.dtype),
                  zero_init_residual=bool(model_config.zero_init_residual))
    variant = str(model_config.get("variant", "torchvision"))
    if variant != "torchvision":  # Absent = 'torchvision' (checkpoints written before it existed).
        kwargs["variant"] = variant
    kwargs.update(extra)
    return kwargs


def build_model(kwargs: dict):
    """``models.build(**kwargs)`` (kwargs as recorded in checkpoint meta)."""
    kwargs = dict(kwargs)
    if "projection_dims" in kwargs:
        kwargs["projection_dims"] = tuple(kwargs["projection_dims"])
    return models.build(kwargs.pop("name"), **kwargs)


def feature_width(config) -> int:
    """C: the width of the backbone's 'pooled' feature for ``config.model`` (shape-only trace)."""
    backbone = build_model(model_kwargs(config.model))
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


def eval_batches(config, split: str, transform: str = "eval_center"):
    """One pass over ``split`` with an evaluation transform (host-local padded batches)."""
    from dvp_jax.input import pipeline
    return pipeline.make_eval_iterator(config.input, split, transform,
                                       global_batch=eval_batch_size(config),
                                       image_size=config.input.image_size)


def eval_batch_size(config) -> int:
    """Evaluation runs with the training batch size (a multiple of the device count)."""
    return config.batch_size


def knn_evaluator(config, model, variables_of: Callable[[Any], dict], mesh,
                  feature: str = "pooled", prefix: str = "knn") -> Callable[[Any], dict]:
    """state -> {'knn_top1': %}: MoCo's weighted k-NN monitor (train bank -> eval split).

    k = config.knn.k (200), weights exp(cos / config.knn.temperature) (0.1), features
    L2-normalised; ``variables_of(state)`` picks the encoder's variables from the state.
    """
    predict = features.model_output(model, feature)

    def evaluate(state) -> dict:
        variables = variables_of(state)
        bank = features.extract_bank(  # Rows stay split over the devices (never on a host).
            predict, variables, eval_batches(config, config.input.train_split), mesh,
            data_sizes(config, mesh).num_train)
        query, labels = features.extract(
            predict, variables, eval_batches(config, config.input.eval_split), mesh)
        num_classes = max(int(jax.device_get(jnp.max(bank.labels))), int(labels.max())) + 1
        scores = metrics.sharded_knn_scores(query, bank, num_classes=num_classes,
                                            k=config.knn.k, temperature=config.knn.temperature,
                                            mesh=mesh)
        return {f"{prefix}_top1": metrics.accuracy_from_scores(scores, labels, ks=(1,))["top1"]}

    return evaluate


def encoder_variables(state) -> dict:
    """The model variables every state carries at its top level."""
    return {"params": state["params"], "batch_stats": state["batch_stats"]}


def dummy_images(config, batch: int = 1) -> jax.Array:
    """Zeros [batch, S, S, 3] to initialise a model at the configured resolution."""
    s = config.input.image_size
    return jnp.zeros((batch, s, s, 3), jnp.float32)
