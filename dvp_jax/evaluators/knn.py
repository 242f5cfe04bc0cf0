"""Weighted k-NN accuracy (MoCo's monitor, the paper's k-NN rows): one plug-in, two callers.

The training loop's k-NN monitor (``trainers/common.knn_evaluator``) and the offline
evaluation (``dvp_jax.evaluate --knn``) both run ``Knn``: queries = centre crops of the
evaluated split, bank = centre crops of the bank split (rows split over the devices,
dvp_jax/features.extract_bank); k nearest bank rows by cosine of L2-normalised features, each
voting for its label with weight exp(cos / temperature) (dvp_jax/metrics.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dvp_jax import metrics
from dvp_jax.evaluators import passes
from dvp_jax.evaluators.data import EvalData


def knn_scores(query, labels: np.ndarray, bank: metrics.ShardedBank, *, k: int,
               temperature: float, mesh, min_classes: int = 0) -> np.ndarray:
    """Class scores [N, C] of ``query`` [N, D] against ``bank`` (rows split over devices).

    C = max(min_classes, largest label in the bank or in ``labels`` [N] + 1)."""
    num_classes = max(int(min_classes), int(jax.device_get(jnp.max(bank.labels))) + 1,
                      int(np.max(labels, initial=0)) + 1)
    return metrics.sharded_knn_scores(query, bank, num_classes=num_classes, k=k,
                                      temperature=temperature, mesh=mesh)


def knn_accuracy(query, labels: np.ndarray, bank: metrics.ShardedBank, *, k: int,
                 temperature: float, mesh, min_classes: int = 0,
                 ks: tuple[int, ...] = (1, 5)) -> dict:
    """{'top1': %, 'top5': % (the ``ks`` asked for)} of the weighted k-NN."""
    scores = knn_scores(query, labels, bank, k=k, temperature=temperature, mesh=mesh,
                        min_classes=min_classes)
    return metrics.accuracy_from_scores(scores, labels, ks=ks)


class Knn:
    """variables -> {'top1': %, 'top5': %} of the weighted k-NN of ``split`` against
    ``bank_split``.

    model: a Flax module returning ``feature`` ('pooled' / 'projection').
    k, temperature: neighbours and weights exp(cos / temperature) (MoCo: 200, 0.1).
    ks: the top-k accuracies returned (the training loop's monitor asks for (1,) only).
    """

    def __init__(self, model, data: EvalData, split: str, bank_split: str, mesh, *,
                 feature: str = "pooled", k: int = 200, temperature: float = 0.1,
                 ks: tuple[int, ...] = (1, 5)):
        self.data, self.split, self.bank_split, self.mesh = data, split, bank_split, mesh
        self.feature, self.k, self.temperature, self.ks = feature, int(k), float(temperature), ks
        self._predict = passes.predict_fn(model, logits=False, feature=feature)

    def predict(self, variables) -> passes.Predictions:
        """The queries: ``feature`` [N, D] of the split's centre crops (not normalised)."""
        out, labels = passes.run_pass(self._predict, variables, self.data, self.split,
                                      "eval_center", self.mesh)
        return passes.Predictions(labels, features=out)

    def __call__(self, variables, query: passes.Predictions | None = None) -> dict:
        """``query``: the split's features if a pass already computed them (e.g.
        accuracy.Accuracy(feature=...)); None = ``predict(variables)``."""
        query = self.predict(variables) if query is None else query
        bank = self.bank(variables)
        return knn_accuracy(query.features, query.labels, bank, k=self.k,
                            temperature=self.temperature, mesh=self.mesh,
                            min_classes=self.data.info(self.bank_split).num_classes, ks=self.ks)

    def bank(self, variables) -> metrics.ShardedBank:
        """The bank split's L2-normalised features, rows split over the devices."""
        return passes.bank_pass(self._predict, variables, self.data, self.bank_split, self.mesh)
