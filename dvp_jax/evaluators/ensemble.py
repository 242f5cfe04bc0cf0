"""Ensembles: the mean over models of their softmax, ranked in the log domain.

Each model contributes log p_m [N, C] (its log-softmax, or with ten crops the log of its mean
softmax over the crops); the ensemble's scores are log(mean_m p_m), computed with logaddexp in
float64 so that classes are ordered exactly as the mean orders them, without underflow.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis of logits [N, C] (host numpy in, host numpy out)."""
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))


def combine(log_probs: list[np.ndarray]) -> np.ndarray:
    """float32 [N, C]: log of the mean over the models of their probabilities."""
    stacked = np.stack(log_probs).astype(np.float64)
    return (np.logaddexp.reduce(stacked, axis=0) - np.log(len(log_probs))).astype(np.float32)
