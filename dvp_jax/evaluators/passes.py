"""One pass of a model over a split: the predict functions and what a pass returns.

A pass returns host numpy arrays identical on every process (padding dropped); a k-NN bank
pass returns a metrics.ShardedBank whose rows stay split over the devices.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dvp_jax import features, metrics
from dvp_jax.evaluators.data import EvalData, EvaluationError


@dataclasses.dataclass
class Predictions:
    """One pass over a split (or an ensemble's combination of passes), padding dropped.

    labels: int32 [N].
    scores: float32 [N, C] class scores or None: logits, or log-probabilities when
      ``scores_are_log_probs`` (ten-crop: log of the crops' mean softmax; ensemble: log of the
      models' mean softmax).
    features: float32 [N, D] (a model output, e.g. 'pooled': the k-NN query) or None.
    """
    labels: np.ndarray
    scores: np.ndarray | None = None
    features: np.ndarray | None = None
    scores_are_log_probs: bool = False

    def log_probs(self) -> np.ndarray:
        """float32 [N, C]: log-probabilities of the classes (log softmax of logits)."""
        return self.scores if self.scores_are_log_probs else log_softmax(self.scores)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis of logits [N, C] (host numpy in, host numpy out)."""
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))


@functools.lru_cache(maxsize=32)
def predict_fn(model, *, logits: bool, feature: str | None) -> features.PredictFn:
    """(variables, images [B, S, S, 3]) -> float32 [B, C + D]: the logits (C columns, if
    ``logits``) and the output ``feature`` ('pooled' / 'projection', D columns) side by side,
    inference-mode BN. Cached per (model, outputs): equal models share one function, so
    features.extract compiles it once for every pass and every member of an ensemble."""
    def predict(variables, images):
        out = model.apply(variables, images, train=False)
        parts = ([out["logits"]] if logits else []) + ([out[feature]] if feature else [])
        return jnp.concatenate([p.astype(jnp.float32) for p in parts], axis=-1)

    return predict


def _data_error(data: EvalData, split: str, e: ValueError) -> EvaluationError:
    return EvaluationError(f"Split {split!r} of {data.input_config.source!r}: {e}")


def run_pass(predict: features.PredictFn, variables, data: EvalData, split: str,
             transform: str, mesh) -> tuple[np.ndarray, np.ndarray]:
    """(outputs [N, ...] float32, labels [N] int32) of ``predict`` over ``split``, padding
    dropped, identical on every process."""
    batches = data.batches(split, transform)
    try:
        return features.extract(predict, variables, batches, mesh)
    except ValueError as e:
        if not data.offline:
            raise
        raise _data_error(data, split, e) from e


def bank_pass(predict: features.PredictFn, variables, data: EvalData, split: str,
              mesh) -> metrics.ShardedBank:
    """The k-NN bank of ``split`` (centre crops, L2-normalised outputs of ``predict``) as a
    metrics.ShardedBank: rows stay split over the devices, never gathered to a host."""
    batches = data.batches(split, "eval_center")
    try:
        return features.extract_bank(predict, variables, batches, mesh,
                                     data.info(split).num_examples)
    except ValueError as e:
        if not data.offline:
            raise
        raise _data_error(data, split, e) from e


def same_labels(reference: np.ndarray | None, labels: np.ndarray, what: str) -> np.ndarray:
    """``labels`` [N], after checking that they equal ``reference`` (the first pass's)."""
    if reference is not None and not np.array_equal(reference, labels):
        raise EvaluationError(
            f"{what} saw other examples than the first model ({len(labels)} vs {len(reference)} "
            f"examples or different labels): all models of an ensemble must be evaluated on the "
            f"same data (check their input.source / splits, or pass --source).")
    return labels
