"""One pass of a model over a split: the predict functions and the passes evaluators run.

A pass returns host numpy arrays identical on every process (padding dropped); a k-NN bank
pass returns a metrics.ShardedBank whose rows stay split over the devices.
"""
from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from dvp_jax import features, metrics, sharding
from dvp_jax.evaluators.members import EvaluationError, Member, split_info
from dvp_jax.models.spec import ModelSpec

log = logging.getLogger("dvp_jax")


def log_mean_softmax(logits: jax.Array, axis: int) -> jax.Array:
    """log(mean over ``axis`` of softmax(logits)), computed stably: [..., n, ..., C] -> [..., C]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jax.scipy.special.logsumexp(logp, axis=axis) - jnp.log(logits.shape[axis])


def make_predict(model, *, scores: bool, feature: str | None) -> features.PredictFn:
    """(variables, images) -> float32 [B, C + D], the outputs one pass needs side by side.

    The first C columns (if ``scores``): logits for images [B, S, S, 3]; for ten-crop images
    [B, 10, S, S, 3] the log of the mean over crops of the softmax. The last D columns (if
    ``feature``): that output ('pooled' / 'projection') of centre crops ([B, S, S, 3] only).
    """
    logits_of = features.model_output(model, "logits")

    def predict(variables, images):
        if images.ndim == 5:
            if feature is not None:
                raise ValueError("Features for k-NN come from centre crops, not ten crops.")
            return log_mean_softmax(logits_of(variables, images), axis=1)
        out = model.apply(variables, images, train=False)
        parts = ([out["logits"]] if scores else []) + ([out[feature]] if feature else [])
        return jnp.concatenate([p.astype(jnp.float32) for p in parts], axis=-1)

    return predict


def global_batch_for(batch_size: int, mesh) -> int:
    """``batch_size`` rounded up to a multiple of the data shards and of the processes."""
    unit = math.lcm(sharding.num_data_shards(mesh), jax.process_count())
    rounded = max(unit, -(-int(batch_size) // unit) * unit)
    if rounded != batch_size:
        log.info("evaluation batch %d rounded up to %d (a multiple of %d devices/processes)",
                 batch_size, rounded, unit)
    return rounded


@functools.lru_cache(maxsize=32)
def cached_predict(spec: ModelSpec, scores: bool, feature: str | None) -> features.PredictFn:
    """One predict function per (model, outputs): features.extract compiles it once and every
    pass and every member of an ensemble reuses that program."""
    return make_predict(spec.build(), scores=scores, feature=feature)


def run_pass(member: Member, split: str, transform: str, *, scores: bool, feature: str | None,
              global_batch: int, mesh) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
    """(scores [N, C] or None, features [N, D] or None, labels [N]) of one pass over ``split``,
    padding dropped, identical on every process."""
    from dvp_jax.input import pipeline
    predict = cached_predict(member.spec, bool(scores), feature)
    batches = pipeline.make_eval_iterator(member.input_config, split, transform,
                                          global_batch=global_batch,
                                          image_size=int(member.input_config.image_size))
    try:
        out, labels = features.extract(predict, member.variables, batches, mesh)
    except ValueError as e:
        raise EvaluationError(f"Split {split!r} of {member.input_config.source!r}: {e}") from e
    c = member.num_classes if scores else 0
    return (out[:, :c] if scores else None), (out[:, c:] if feature else None), labels


def bank_pass(member: Member, split: str, feature: str, global_batch: int, mesh):
    """The k-NN bank of ``split`` (centre crops, ``feature``) as a metrics.ShardedBank: rows
    stay split over the devices, never gathered to a host."""
    from dvp_jax.input import pipeline
    predict = cached_predict(member.spec, False, feature)
    batches = pipeline.make_eval_iterator(member.input_config, split, "eval_center",
                                          global_batch=global_batch,
                                          image_size=int(member.input_config.image_size))
    try:
        return features.extract_bank(predict, member.variables, batches, mesh,
                                     split_info(member.input_config, split).num_examples)
    except ValueError as e:
        raise EvaluationError(f"Split {split!r} of {member.input_config.source!r}: {e}") from e


def same_labels(reference: np.ndarray | None, labels: np.ndarray, what: str) -> np.ndarray:
    if reference is not None and not np.array_equal(reference, labels):
        raise EvaluationError(
            f"{what} saw other examples than the first model ({len(labels)} vs {len(reference)} "
            f"examples or different labels): all models of an ensemble must be evaluated on the "
            f"same data (check their input.source / splits, or pass --source).")
    return labels


def accuracy(scores: np.ndarray, labels: np.ndarray, prefix: str = "") -> dict:
    acc = metrics.accuracy_from_scores(scores, labels, ks=(1, 5))
    return {f"{prefix}top1": acc["top1"], f"{prefix}top5": acc["top5"]}
