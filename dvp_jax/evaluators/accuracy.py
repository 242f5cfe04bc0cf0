"""Top-1 / top-5 of a model's classifier on one split (centre crops, inference-mode BN).

    evaluator = Accuracy(model, EvalData(config.input, 256), "val", mesh)
    evaluator(variables)  # -> {'top1': %, 'top5': %}
"""
from __future__ import annotations

import numpy as np

from dvp_jax import metrics
from dvp_jax.evaluators import passes
from dvp_jax.evaluators.data import EvalData

EVAL_TRANSFORM = "eval_center"


def top_k(scores: np.ndarray, labels: np.ndarray) -> dict:
    """{'top1': %, 'top5': %} of class scores [N, C] against labels [N] (ties: lower class
    first)."""
    acc = metrics.accuracy_from_scores(scores, labels, ks=(1, 5))
    return {"top1": acc["top1"], "top5": acc["top5"]}


class Accuracy:
    """variables -> {'top1': %, 'top5': %} of ``model``'s logits on ``split``.

    model: a Flax module with a classifier (``model.num_classes`` > 0) returning 'logits'.
    transform: a single-crop evaluation transform (default 'eval_center').
    feature: also return that output ('pooled' / 'projection') from the same pass in
      ``predict`` (``Predictions.features``: e.g. the k-NN query, one pass for both).
    """

    def __init__(self, model, data: EvalData, split: str, mesh, *,
                 transform: str = EVAL_TRANSFORM, feature: str | None = None):
        self.data, self.split, self.mesh, self.transform = data, split, mesh, transform
        self.num_classes = int(model.num_classes)
        self.feature = feature
        self._predict = passes.predict_fn(model, logits=True, feature=feature)

    def predict(self, variables) -> passes.Predictions:
        """Logits [N, C] (and ``feature`` [N, D]) of every example of the split."""
        out, labels = passes.run_pass(self._predict, variables, self.data, self.split,
                                      self.transform, self.mesh)
        c = self.num_classes
        return passes.Predictions(labels, scores=out[:, :c],
                                  features=out[:, c:] if self.feature else None)

    def __call__(self, variables) -> dict:
        pred = self.predict(variables)
        return top_k(pred.scores, pred.labels)
