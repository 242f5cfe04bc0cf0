"""Ten-crop classification: top-1 / top-5 of the mean over ten crops of the softmax.

The 'ten_crop' transform gives images [B, 10, S, S, 3] (corners + centre, and their mirror
images; dvp_jax/input/eval_crops.py); a model's scores are log(mean over crops of softmax),
computed on the devices in the log domain (logsumexp of log-softmax), which orders classes
exactly as the mean does without underflowing to ties.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dvp_jax import features
from dvp_jax.evaluators import passes
from dvp_jax.evaluators.accuracy import top_k
from dvp_jax.evaluators.data import EvalData

TEN_CROP = "ten_crop"


def log_mean_softmax(logits: jax.Array, axis: int) -> jax.Array:
    """log(mean over ``axis`` of softmax(logits)), computed stably: [..., n, ..., C] -> [..., C]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jax.scipy.special.logsumexp(logp, axis=axis) - jnp.log(logits.shape[axis])


@functools.lru_cache(maxsize=32)
def ten_crop_predict(model) -> features.PredictFn:
    """(variables, images [B, n, S, S, 3]) -> float32 [B, C]: log of the mean over the n crops
    of the softmax of ``model``'s logits (one function per model, compiled once)."""
    logits_of = features.model_output(model, "logits")

    def predict(variables, images):
        return log_mean_softmax(logits_of(variables, images), axis=1)

    return predict


class TenCropAccuracy:
    """variables -> {'top1': %, 'top5': %} of the crops' mean softmax of ``model``'s classifier
    on ``split``; ``predict`` gives its log [N, C] (``Predictions.scores_are_log_probs``)."""

    def __init__(self, model, data: EvalData, split: str, mesh):
        self.data, self.split, self.mesh = data, split, mesh
        self._predict = ten_crop_predict(model)

    def predict(self, variables) -> passes.Predictions:
        scores, labels = passes.run_pass(self._predict, variables, self.data, self.split,
                                         TEN_CROP, self.mesh)
        return passes.Predictions(labels, scores=scores, scores_are_log_probs=True)

    def __call__(self, variables) -> dict:
        pred = self.predict(variables)
        return top_k(pred.scores, pred.labels)
