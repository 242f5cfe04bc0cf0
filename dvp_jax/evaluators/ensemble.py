"""Ensembles: top-1 / top-5 of the mean over models of their softmax.

Each model contributes log p_m [N, C] (its log-softmax, or with ten crops the log of its mean
softmax over the crops); the ensemble's scores are log(mean_m p_m), computed with logaddexp in
float64 so that classes are ordered exactly as the mean orders them, without underflow.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dvp_jax.evaluators import passes
from dvp_jax.evaluators.accuracy import top_k


def combine(log_probs: list[np.ndarray]) -> np.ndarray:
    """float32 [N, C]: log of the mean over the models of their probabilities."""
    stacked = np.stack(log_probs).astype(np.float64)
    return (np.logaddexp.reduce(stacked, axis=0) - np.log(len(log_probs))).astype(np.float32)


def combine_predictions(predictions: Sequence[passes.Predictions]) -> passes.Predictions:
    """The ensemble of the models' passes over the same examples (labels checked equal)."""
    labels = None
    for i, p in enumerate(predictions):
        labels = passes.same_labels(labels, p.labels, f"Model {i}")
    return passes.Predictions(labels, scores=combine([p.log_probs() for p in predictions]),
                              scores_are_log_probs=True)


class Ensemble:
    """[variables of model 0, of model 1, ...] -> {'top1': %, 'top5': %} of the mean softmax.

    evaluators: one classifier plug-in per model (accuracy.Accuracy or
    multicrop.TenCropAccuracy), all on the same split.
    """

    def __init__(self, evaluators: Sequence):
        self.evaluators = list(evaluators)

    def predict(self, variables: Sequence) -> passes.Predictions:
        if len(variables) != len(self.evaluators):
            raise ValueError(f"{len(variables)} models' variables for {len(self.evaluators)} "
                             "evaluators.")
        return combine_predictions([e.predict(v) for e, v in zip(self.evaluators, variables)])

    def __call__(self, variables: Sequence) -> dict:
        pred = self.predict(variables)
        return top_k(pred.scores, pred.labels)
