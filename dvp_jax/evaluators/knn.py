"""Weighted k-NN accuracy (MoCo's monitor, the paper's k-NN rows): one core, two callers.

The training loop's k-NN monitor (``trainers/common.knn_evaluator``) and the offline
evaluation (``dvp_jax.evaluate --knn``) both score queries against a bank with
``knn_accuracy``: k nearest bank rows by cosine of L2-normalised features, each voting for its
label with weight exp(cos / temperature).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dvp_jax import metrics


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
