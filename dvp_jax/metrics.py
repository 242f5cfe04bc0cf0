"""Accuracy metrics: top-k and MoCo's weighted k-NN classifier (bank sharded over devices)."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dvp_jax import sharding



def topk_correct(logits: jax.Array, labels: jax.Array, ks=(1, 5)) -> dict[int, jax.Array]:
    """{k: bool [B]}: the label is among the k largest logits [B, N] (ties broken by index)."""
    order = jnp.argsort(-logits, axis=-1, stable=True)
    hits = order == labels[:, None]
    return {k: jnp.any(hits[:, :min(k, logits.shape[-1])], axis=-1) for k in ks}


@dataclasses.dataclass
class ShardedBank:
    """A k-NN feature bank split by rows over the mesh's 'data' axis (``sharding.batch_sharded``).

    features: float32 [R, D], L2-normalised rows, R = devices x rows per device; row order is
        an interleaving of the eval batches (irrelevant to k-NN).
    labels: int32 [R], -1 on padding rows (which never vote).
    size: the real examples N <= R.
    """
    features: jax.Array
    labels: jax.Array
    size: int


# Bytes of similarities one device computes at a time (query chunk x its bank rows, float32).
SIMILARITY_BUDGET_BYTES = 256 * 2**20


@functools.lru_cache(maxsize=32)
def _sharded_knn_fn(mesh, k: int, num_classes: int):
    """jit((query [q, D] replicated, bank [R, D] row-sharded, labels [R] row-sharded, T))
    -> class scores [q, num_classes] replicated. Top-k per device shard, then merged."""
    from jax.sharding import PartitionSpec as P
    axis = sharding.DATA_AXIS

    def local(query, bank, labels, temperature):
        sim = query @ bank.T  # [q, rows of this device]
        sim = jnp.where(labels[None, :] >= 0, sim, -jnp.inf)  # Padding rows never win.
        kk = min(k, bank.shape[0])
        top_sim, top_idx = jax.lax.top_k(sim, kk)
        top_lab = labels[top_idx]
        all_sim = jax.lax.all_gather(top_sim, axis, axis=1, tiled=True)  # [q, devices * kk]
        all_lab = jax.lax.all_gather(top_lab, axis, axis=1, tiled=True)
        best_sim, best = jax.lax.top_k(all_sim, k)
        best_lab = jnp.take_along_axis(all_lab, best, axis=1)
        weights = jnp.where(jnp.isfinite(best_sim), jnp.exp(best_sim / temperature), 0.0)
        votes = jax.nn.one_hot(best_lab, num_classes) * weights[..., None]
        return jnp.sum(votes, axis=1)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis), P(axis), P()),
                                 out_specs=P(), check_vma=False))


def sharded_knn_scores(query_features, bank, *, num_classes: int, k: int = 200,
                       temperature: float = 0.1, mesh=None) -> np.ndarray:
    """MoCo's weighted k-NN against a row-sharded bank: class scores [Q, num_classes].

    ``bank``: a ``ShardedBank`` (e.g. from ``features.extract_bank``) (L2-normalised rows split over the mesh's devices).
    Queries [Q, D] (host, identical on every process) are L2-normalised here and processed in
    chunks small enough that one device's similarities stay under SIMILARITY_BUDGET_BYTES.
    Each device finds the k nearest of its own rows; the devices' candidates are merged into
    the global k nearest, each voting for its label with weight exp(cos / temperature).
    k is clipped to the bank size. Device memory: its bank rows + about the budget.
    """
    mesh = mesh or bank.features.sharding.mesh
    k = int(min(k, bank.size))
    rows_per_device = bank.features.shape[0] // sharding.num_data_shards(mesh)
    chunk = int(max(1, min(4096, SIMILARITY_BUDGET_BYTES // (4 * rows_per_device))))
    fn = _sharded_knn_fn(mesh, k, int(num_classes))
    query = np.asarray(query_features, np.float32)
    query = query / np.maximum(np.linalg.norm(query, axis=-1, keepdims=True), 1e-12)
    temperature = jnp.float32(temperature)
    out = []
    for i in range(0, len(query), chunk):
        q = query[i:i + chunk]
        q = np.pad(q, ((0, chunk - len(q)), (0, 0)))  # One shape: one compilation.
        scores = fn(sharding.put_replicated(q, mesh), bank.features, bank.labels, temperature)
        out.append(np.asarray(jax.device_get(scores))[:min(chunk, len(query) - i)])
    return np.concatenate(out, axis=0) if out else np.zeros((0, num_classes), np.float32)


def weighted_knn_scores(query_features, bank_features, bank_labels, *, num_classes: int,
                        k: int = 200, temperature: float = 0.1, mesh=None) -> np.ndarray:
    """MoCo's weighted k-NN for host arrays: bank [N, D] / labels [N] are L2-normalised, split
    over the devices of ``mesh`` (default: all) and scored by ``sharded_knn_scores``."""
    mesh = mesh or sharding.make_mesh()
    n_dev = sharding.num_data_shards(mesh)
    bank = np.asarray(bank_features, np.float32)
    bank = bank / np.maximum(np.linalg.norm(bank, axis=-1, keepdims=True), 1e-12)
    pad = -len(bank) % n_dev
    bank = np.pad(bank, ((0, pad), (0, 0)))
    labels = np.pad(np.asarray(bank_labels, np.int32), (0, pad), constant_values=-1)
    data = sharding.batch_sharded(mesh)
    sharded = ShardedBank(jax.device_put(bank, data), jax.device_put(labels, data),
                                   size=len(bank) - pad)
    return sharded_knn_scores(query_features, sharded, num_classes=num_classes, k=k,
                              temperature=temperature, mesh=mesh)


def accuracy_from_scores(scores, labels, ks=(1, 5)) -> dict[str, float]:
    """{'top1': %, 'top5': %} of class scores [N, C] against labels [N], in percent."""
    correct = topk_correct(jnp.asarray(scores), jnp.asarray(labels), ks)
    return {f"top{k}": 100.0 * float(jnp.mean(v)) for k, v in correct.items()}
