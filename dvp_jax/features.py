"""Running a model over an evaluation split: features / logits of every example, on every host.

``extract`` consumes an eval iterator (dvp_jax.input.pipeline.make_eval_iterator: host-local
batches with 'image', 'label', 'mask'), shards each batch over the mesh, runs a jitted
predict function and returns host numpy arrays of the whole split with padding dropped.
Outputs are replicated, so every process gets the same full arrays.

``extract_bank`` is the variant for k-NN feature banks (ImageNet: 1.28 M x 2048 float32 =
10.5 GB): the features never reach a host and stay split by rows over the devices of the mesh
(and so over the hosts), about bank / devices bytes per device.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dvp_jax import sharding
from dvp_jax.metrics import ShardedBank

PredictFn = Callable[[Any, jax.Array], jax.Array]  # (variables, images [B,H,W,3]) -> [B, ...]


def model_output(model, key: str) -> PredictFn:
    """Predict function returning ``model``'s named output ``key`` (inference-mode BN).

    Images with an extra crop axis [B, n, H, W, 3] (ten-crop) give [B, n, ...].
    """
    def predict(variables, images):
        if images.ndim == 5:
            b, n = images.shape[:2]
            out = model.apply(variables, images.reshape((b * n,) + images.shape[2:]), train=False)
            out = out[key]
            return out.reshape((b, n) + out.shape[1:])
        return model.apply(variables, images, train=False)[key]
    return predict


@functools.lru_cache(maxsize=64)
def _compiled_runner(predict: PredictFn, mesh):
    """One jitted program per (predict function, mesh): repeated passes never recompile."""
    rep = sharding.replicated(mesh)

    @jax.jit
    def run(variables, images, labels, mask):
        out = predict(variables, images).astype(jnp.float32)
        return tuple(jax.lax.with_sharding_constraint(x, rep) for x in (out, labels, mask))

    return run


def extract(predict: PredictFn, variables: Any, batches: Iterable[dict], mesh,
            image_key: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """(outputs [N, ...] float32, labels [N] int32) over the whole split, padding removed.

    Keep ``predict`` the same object across calls (e.g. build it once per evaluator) so its
    compiled program is reused.
    """
    run = _compiled_runner(predict, mesh)
    outputs, labels = [], []
    for batch in batches:
        g = sharding.to_global({k: batch[k] for k in (image_key, "label", "mask")}, mesh)
        out, lab, mask = jax.device_get(run(variables, g[image_key], g["label"], g["mask"]))
        keep = mask > 0
        outputs.append(out[keep])
        labels.append(lab[keep])
    if not outputs:
        raise ValueError("The evaluation split yielded no batches.")
    return np.concatenate(outputs), np.concatenate(labels).astype(np.int32)


@functools.lru_cache(maxsize=64)
def _compiled_bank_runner(predict: PredictFn, mesh):
    """Like ``_compiled_runner`` but outputs stay batch-sharded; padding rows get label -1."""
    data = sharding.batch_sharded(mesh)

    @jax.jit
    def run(variables, images, labels, mask):
        out = predict(variables, images).astype(jnp.float32)
        out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
        labels = jnp.where(mask > 0, labels, -1).astype(jnp.int32)
        return (jax.lax.with_sharding_constraint(out, data),
                jax.lax.with_sharding_constraint(labels, data))

    return run


def bank_from_local_pieces(pieces: dict, mesh, size: int) -> ShardedBank:
    """{device: [(features [b, D], labels [b]) on that device, ...]} of this process's devices
    -> ShardedBank; each device's pieces are concatenated on that device (equal counts)."""
    data = sharding.batch_sharded(mesh)
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    feats = [jnp.concatenate([f for f, _ in pieces[d]]) for d in local]
    labels = [jnp.concatenate([l for _, l in pieces[d]]) for d in local]
    rows = feats[0].shape[0] * mesh.devices.size
    return ShardedBank(
        features=jax.make_array_from_single_device_arrays((rows, feats[0].shape[1]), data, feats),
        labels=jax.make_array_from_single_device_arrays((rows,), data, labels), size=size)


def extract_bank(predict: PredictFn, variables: Any, batches: Iterable[dict], mesh,
                 image_key: str = "image") -> ShardedBank:
    """The split's L2-normalised outputs as a ShardedBank: nothing is gathered to a host or
    replicated; each device keeps its own rows of every batch (about N x D x 4 / devices bytes,
    twice that briefly while the final per-device concatenation runs)."""
    run = _compiled_bank_runner(predict, mesh)
    pieces: dict = {}
    size = 0
    for batch in batches:
        size += int(np.sum(np.asarray(batch["mask"]) > 0))  # This process's real rows.
        g = sharding.to_global({k: batch[k] for k in (image_key, "label", "mask")}, mesh)
        out, lab = run(variables, g[image_key], g["label"], g["mask"])
        lab_shards = {s.device: s.data for s in lab.addressable_shards}
        for s in out.addressable_shards:
            pieces.setdefault(s.device, []).append((s.data, lab_shards[s.device]))
    if not pieces:
        raise ValueError("The evaluation split yielded no batches.")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        size = int(np.sum(multihost_utils.process_allgather(np.array(size))))
    return bank_from_local_pieces(pieces, mesh, size)
