"""Host-local batches for training (infinite, deterministic, resumable) and evaluation (padded).

Train (``make_train_iterator``). An epoch has ``steps_per_epoch = N // global_batch`` steps (the
last partial batch is dropped). Epoch ``e`` visits the split in an order that depends only on
(seed, e); global batch ``k`` of the epoch is positions [k*B, (k+1)*B) of that order, and process
``p`` of ``P`` takes the p-th slice of B/P of it.
  * Indexed sources (digits, synthetic, folder): the order is a stateless shuffle of the whole
    split (seed from (seed, e)), so the global batch is the same for any process count.
  * TFDS sources: each process shuffles its own shard in a ``input.shuffle_buffer`` buffer seeded
    from (seed, e) (records still encoded).
Each example's augmentation seed is stateless_fold_in(fold_in((seed, 2), e), index): a pure
function of (seed, epoch, example index). Resuming at ``start_step = s`` starts at epoch
s // steps_per_epoch and skips the indices (or encoded records) of the steps before s in that
epoch before decoding anything, so it yields exactly the batches an uninterrupted run yields from
step s on.

Batches: dict of numpy arrays with leading dimension global_batch // process_count: the
transform's outputs (float32), 'label' int32 [b], 'index' int32 [b] (position in the split),
with input.augment_on='device' (train batches of 'moco_v2' / 'train_crop_flip' only) instead
'image' uint8 [b, R, R, 3] (transform 'stored_uint8') and 'epoch' int32 [b], from which the
train step makes the views on the devices (device_augment.py),
plus 'mask' float32 [b] for eval batches (1 = real example, 0 = padding; padded rows are zeros
with label -1 and index -1, so always select with the mask).
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import tensorflow as tf

from dvp_jax.input import augment, device_augment, sources

AUTOTUNE = tf.data.AUTOTUNE
_SHUFFLE_STREAM, _AUGMENT_STREAM = 1, 2  # Keep the shuffle and augmentation seeds independent.
# Our map functions use tf.cond / tf.switch_case explicitly; skipping AutoGraph's conversion
# makes building the MoCo graph several times faster.
_graph_fn = tf.autograph.experimental.do_not_convert


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches per epoch (the last partial batch is dropped); at least 1."""
    if global_batch <= 0:
        raise ValueError(f"global_batch must be positive, got {global_batch}.")
    steps = num_examples // global_batch
    if steps < 1:
        raise ValueError(f"The split has {num_examples} examples, fewer than one global batch of "
                         f"{global_batch}; lower batch_size to at most {num_examples}.")
    return steps


def _processes(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # Only when not given: tests and tools pass them explicitly.
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
    return int(process_index), int(process_count)


def _local_batch(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(f"global_batch={global_batch} is not divisible by the {process_count} "
                         f"processes.")
    return global_batch // process_count


def _options(input_config) -> tf.data.Options:
    """Deterministic order; tf.data's model-based autotuner off.

    With the autotuner off, maps given AUTOTUNE run on all schedulable cores and prefetch
    buffers grow by tf.data's own rule (as with the autotuner on). The autotuner's thread sleeps
    up to 60 s between rounds, and destroying an iterator waits for it: on the digits pipeline
    that cost ~5 s per stage (150 s of the default job's 15 minutes) with the main thread idle.
    Measured with `python -m dvp_jax.benchmark input --res 64 --batch 64` on 2 cores: 806 host /
    2241 device img/s with it off, 708 / 1911 with it on (one run, same machine).
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    options.deterministic = True
    threads = int(input_config.get("threadpool_size", 0) or 0)
    if threads > 0:
        options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    return options


def _seed_pair(seed: int, stream: int) -> tf.Tensor:
    return tf.constant([seed % (2 ** 63), stream], tf.int64)


def epoch_seed(seed: int, stream: int, epoch) -> tf.Tensor:
    """Stateless seed int32 [2] for (seed, stream, epoch)."""
    return tf.random.experimental.stateless_fold_in(_seed_pair(seed, stream), tf.cast(epoch, tf.int64))


def example_seed(seed: int, epoch, index) -> tf.Tensor:
    """The augmentation seed int32 [2] of example ``index`` in epoch ``epoch``."""
    return tf.random.experimental.stateless_fold_in(
        epoch_seed(seed, _AUGMENT_STREAM, epoch), tf.cast(index, tf.int64))


def epoch_order(num_examples: int, seed: int, epoch) -> tf.Tensor:
    """The order int64 [num_examples] in which an indexed source's split is visited in ``epoch``."""
    return tf.random.experimental.stateless_shuffle(
        tf.range(num_examples, dtype=tf.int64), seed=epoch_seed(seed, _SHUFFLE_STREAM, epoch))


def _output_fn(transform_fn, seed: int, with_epoch: bool = False):
    """(epoch, element) -> transform outputs + 'label' int32 + 'index' int32 (+ 'epoch' int32)."""
    def fn(epoch, element):
        out = dict(transform_fn(element["image"], example_seed(seed, epoch, element["index"])))
        out["label"] = tf.cast(element["label"], tf.int32)
        out["index"] = tf.cast(element["index"], tf.int32)
        if with_epoch:
            out["epoch"] = tf.cast(epoch, tf.int32)
        return out
    return fn


def _indexed_train_stream(source, split, n, seed, spe, global_batch, local_batch,
                          process_index, process_count, first_epoch):
    """(epoch, index) pairs of this process, from ``first_epoch`` on, forever."""
    def epoch_indices(epoch):
        order = epoch_order(n, seed, epoch)[:spe * global_batch]
        mine = tf.reshape(order, [spe, process_count, local_batch])[:, process_index, :]
        mine = tf.reshape(mine, [-1])
        return tf.data.Dataset.from_tensor_slices((tf.fill(tf.shape(mine), epoch), mine))

    return tf.data.Dataset.range(first_epoch, 2 ** 62).flat_map(epoch_indices)


def _tfds_train_stream(source, split, seed, spe, local_batch, process_index, process_count,
                       first_epoch, shuffle_buffer):
    """(epoch, encoded element) pairs of this process, from ``first_epoch`` on, forever."""
    encoded = source.encoded_dataset(split, process_index, process_count)

    def epoch_elements(epoch):
        shuffle_seed = tf.cast(epoch_seed(seed, _SHUFFLE_STREAM, epoch)[0], tf.int64)
        ds = encoded.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        return ds.take(spe * local_batch).map(lambda el: (epoch, el))

    return tf.data.Dataset.range(first_epoch, 2 ** 62).flat_map(epoch_elements)


def make_train_dataset(input_config, split: str, transform: str, *, global_batch: int, seed: int,
                       start_step: int = 0, image_size: int | None = None,
                       process_index: int | None = None,
                       process_count: int | None = None) -> tf.data.Dataset:
    """The tf.data.Dataset behind ``make_train_iterator`` (batched, infinite)."""
    process_index, process_count = _processes(process_index, process_count)
    local_batch = _local_batch(global_batch, process_count)
    source = sources.get_source(input_config)
    n = source.info(split).num_examples
    spe = steps_per_epoch(n, global_batch)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    first_epoch, step_in_epoch = divmod(int(start_step), spe)
    device = device_augment.on_device(input_config, transform)
    transform_fn = augment.get_transform("stored_uint8" if device else transform, input_config,
                                         image_size=image_size or input_config.image_size)
    output_fn = _output_fn(transform_fn, seed, with_epoch=device)

    if isinstance(source, sources.IndexedSource):
        ds = _indexed_train_stream(source, split, n, seed, spe, global_batch, local_batch,
                                   process_index, process_count, first_epoch)
        ds = ds.skip(step_in_epoch * local_batch)  # Indices only: nothing decoded yet.
        load = source.element_fn(split)
        ds = ds.map(_graph_fn(lambda epoch, index: output_fn(epoch, load(index))),
                    num_parallel_calls=AUTOTUNE, deterministic=True)
        if source.may_fail_at_runtime:
            ds = ds.ignore_errors(log_warning=True)
    else:
        buffer = max(1, min(int(input_config.shuffle_buffer), n))
        ds = _tfds_train_stream(source, split, seed, spe, local_batch, process_index,
                                process_count, first_epoch, buffer)
        ds = ds.skip(step_in_epoch * local_batch)  # Encoded records: not decoded.
        ds = ds.map(_graph_fn(lambda epoch, el: output_fn(epoch, source.decode(el))),
                    num_parallel_calls=AUTOTUNE, deterministic=True)
        ds = ds.ignore_errors(log_warning=True)  # Undecodable or over input.max_image_pixels.
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(AUTOTUNE)
    return ds.with_options(_options(input_config))


def make_train_iterator(input_config, split: str, transform: str, *, global_batch: int, seed: int,
                        start_step: int = 0, image_size: int | None = None,
                        process_index: int | None = None,
                        process_count: int | None = None) -> Iterator[dict]:
    """Infinite iterator of host-local numpy train batches (see module docstring).

    Batch k yielded here is step ``start_step + k`` of the run, identical (bitwise) to what an
    uninterrupted iterator from step 0 yields at that step.
    """
    ds = make_train_dataset(input_config, split, transform, global_batch=global_batch, seed=seed,
                            start_step=start_step, image_size=image_size,
                            process_index=process_index, process_count=process_count)
    return iter(ds.as_numpy_iterator())


def make_eval_iterator(input_config, split: str, transform: str, *, global_batch: int,
                       image_size: int | None = None, process_index: int | None = None,
                       process_count: int | None = None) -> Iterator[dict]:
    """One pass over the split: every process yields ceil(N / global_batch) batches of
    global_batch // process_count examples, its shard padded at the end; 'mask' marks real rows,
    so each example counts exactly once over all processes. Augmentation seeds: (0, 0, index).
    """
    process_index, process_count = _processes(process_index, process_count)
    local_batch = _local_batch(global_batch, process_count)
    source = sources.get_source(input_config)
    n = source.info(split).num_examples
    num_batches = math.ceil(n / global_batch)
    transform_fn = augment.get_transform(transform, input_config,
                                         image_size=image_size or input_config.image_size)
    output_fn = _output_fn(transform_fn, seed=0)
    ds = source.dataset(split, process_index, process_count)
    ds = ds.map(_graph_fn(lambda el: dict(output_fn(0, el), mask=tf.constant(1.0, tf.float32))),
                num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch).prefetch(AUTOTUNE).with_options(_options(input_config))
    spec = ds.element_spec
    return _padded(ds.as_numpy_iterator(), spec, local_batch, num_batches)


def _pad_rows(batch: dict | None, spec: dict, local_batch: int) -> dict:
    """Pads ``batch`` (or nothing) to ``local_batch`` rows: zeros, label/index -1, mask 0."""
    rows = 0 if batch is None else len(batch["mask"])
    out = {}
    for key, s in spec.items():
        shape = (local_batch - rows,) + tuple(s.shape[1:])
        if None in shape:
            raise ValueError(f"Transform output {key!r} has no static shape {s.shape}; eval "
                             f"padding needs one.")
        fill = -1 if key in ("label", "index") else 0
        pad = np.full(shape, fill, s.dtype.as_numpy_dtype)
        out[key] = pad if batch is None else np.concatenate([batch[key], pad])
    return out


def _padded(batches, spec, local_batch: int, num_batches: int) -> Iterator[dict]:
    count = 0
    for batch in batches:
        if len(batch["mask"]) < local_batch:
            batch = _pad_rows(batch, spec, local_batch)
        count += 1
        if count > num_batches:
            raise RuntimeError(f"Eval shard yielded more than {num_batches} batches.")
        yield batch
    for _ in range(num_batches - count):
        yield _pad_rows(None, spec, local_batch)
