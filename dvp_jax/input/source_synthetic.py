"""'synthetic': deterministic random images, learnable from their colour."""
from __future__ import annotations

import zlib

import numpy as np
import tensorflow as tf

from dvp_jax.input.source_base import IndexedSource, SplitInfo
from dvp_jax.input.splits import parse_split, slice_bounds


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8")) & 0x7FFFFFFF


class SyntheticSource(IndexedSource):
    """Deterministic random images, learnable from their colour.

    Any split name works; each has ``synthetic_num_examples`` examples and its own images
    (seeded by a hash of the split name). Label of example ``i`` is ``i % synthetic_num_classes``;
    the image is half uniform noise, half a fixed colour per class, uint8
    [synthetic_image_size (or image_size), same, 3].
    """

    def __init__(self, input_config):
        self._n = int(input_config.synthetic_num_examples)
        self._classes = int(input_config.synthetic_num_classes)
        self._size = int(input_config.get("synthetic_image_size", 0) or input_config.image_size)

    def info(self, split: str) -> SplitInfo:
        n = 0
        for _, lo, hi in parse_split(split):
            start, stop = slice_bounds(self._n, lo, hi)
            n += stop - start
        return SplitInfo(n, self._classes, tuple(str(c) for c in range(self._classes)))

    def element_fn(self, split: str):
        # Map the split's positions to (part seed, example index in that part).
        part_seeds, part_ids = [], []
        for name, lo, hi in parse_split(split):
            start, stop = slice_bounds(self._n, lo, hi)
            part_ids.append(np.arange(start, stop, dtype=np.int64))
            part_seeds.append(np.full(stop - start, _stable_hash(name), np.int64))
        seeds = tf.constant(np.concatenate(part_seeds))
        ids = tf.constant(np.concatenate(part_ids))
        size, classes = self._size, self._classes

        def element(index):
            example = tf.gather(ids, index)
            label = tf.cast(example % classes, tf.int32)
            noise = tf.random.stateless_uniform(
                [size, size, 3], seed=tf.stack([tf.gather(seeds, index), example]),
                minval=0, maxval=256, dtype=tf.int32)
            colour = tf.random.stateless_uniform(
                [3], seed=tf.stack([tf.constant(7919, tf.int64), tf.cast(label, tf.int64)]),
                minval=0, maxval=256, dtype=tf.int32)
            image = tf.cast((noise + colour) // 2, tf.uint8)
            return {"image": image, "label": label, "index": tf.cast(index, tf.int64)}

        return element

