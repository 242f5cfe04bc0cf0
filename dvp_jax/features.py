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
    """jit((variables, images, labels, mask, bank, bank_labels, row)) -> (bank, bank_labels):
    the batch's L2-normalised outputs written in place (buffers donated) into every device's
    own rows [row, row + B / devices) of the bank; padding rows get label -1."""
    from jax.sharding import PartitionSpec as P
    axis = sharding.DATA_AXIS

    def write(bank, bank_labels, out, labels, row):
        return (jax.lax.dynamic_update_slice(bank, out, (row, 0)),
                jax.lax.dynamic_update_slice(bank_labels, labels, (row,)))

    write_local = jax.shard_map(write, mesh=mesh, in_specs=(P(axis),) * 4 + (P(),),
                                out_specs=(P(axis), P(axis)), check_vma=False)

    @functools.partial(jax.jit, donate_argnums=(4, 5))
    def run(variables, images, labels, mask, bank, bank_labels, row):
        out = predict(variables, images).astype(jnp.float32)
        out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
        labels = jnp.where(mask > 0, labels, -1).astype(jnp.int32)
        return write_local(bank, bank_labels, out, labels, row)

    return run


def extract_bank(predict: PredictFn, variables: Any, batches: Iterable[dict], mesh,
                 num_examples: int, image_key: str = "image") -> ShardedBank:
    """The split's L2-normalised outputs as a ShardedBank, nothing gathered to a host.

    ``num_examples``: the split's size N (sizes the bank: ceil(N / global batch) batches).
    Each device keeps its share of every batch in one preallocated buffer written in place:
    N_padded x D x 4 / devices bytes per device, plus one batch's outputs.
    """
    run = _compiled_bank_runner(predict, mesh)
    data = sharding.batch_sharded(mesh)
    n_dev = sharding.num_data_shards(mesh)
    bank = bank_labels = None
    num_batches = rows = 0
    for i, batch in enumerate(batches):
        g = sharding.to_global({k: batch[k] for k in (image_key, "label", "mask")}, mesh)
        global_batch = g["label"].shape[0]
        if bank is None:
            num_batches = -(-int(num_examples) // global_batch)
            rows = num_batches * global_batch
            dim = jax.eval_shape(predict, variables, g[image_key]).shape[-1]
            bank = jax.jit(lambda: jnp.zeros((rows, dim), jnp.float32), out_shardings=data)()
            bank_labels = jax.jit(lambda: jnp.full((rows,), -1, jnp.int32), out_shardings=data)()
        if i >= num_batches:
            raise ValueError(f"The evaluation split yielded more than the {num_batches} batches "
                             f"of {num_examples} examples.")
        bank, bank_labels = run(variables, g[image_key], g["label"], g["mask"], bank, bank_labels,
                                jnp.int32(i * global_batch // n_dev))
    if bank is None:
        raise ValueError("The evaluation split yielded no batches.")
    return ShardedBank(features=bank, labels=bank_labels, size=int(num_examples))
