"""'digits': scikit-learn's 1,797 handwritten 8x8 digits, split per class."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from dvp_jax.errors import DataError
from dvp_jax.input.source_base import IndexedSource, SplitInfo
from dvp_jax.input.splits import parse_split, slice_bounds


class DigitsSource(IndexedSource):
    """scikit-learn's handwritten digits (8x8, values 0..16, 10 classes), split per class.

    For each class (in order 0..9) a ``numpy.random.default_rng(split_seed)`` permutation of
    that class's images gives ``digits_train_per_class`` train images, then
    ``digits_val_per_class`` val and ``digits_test_per_class`` test images (disjoint). Each
    split lists its images in the data set's original order. Images are upsampled bilinearly
    (half-pixel centres) to ``digits_image_size`` pixels, scaled 0..16 -> 0..255 (rounded), and
    repeated over 3 identical channels. Class names '0'..'9'.
    """

    SPLITS = ("train", "val", "test")

    def __init__(self, input_config):
        from sklearn.datasets import load_digits
        digits = load_digits()
        self._images = digits.images.astype(np.float32)  # [1797, 8, 8], 0..16.
        self._labels = digits.target.astype(np.int32)
        self._size = int(input_config.get("digits_image_size", 32))
        per_class = {"train": int(input_config.digits_train_per_class),
                     "val": int(input_config.digits_val_per_class),
                     "test": int(input_config.digits_test_per_class)}
        rng = np.random.default_rng(int(input_config.split_seed))
        chosen = {name: [] for name in self.SPLITS}
        needed = sum(per_class.values())
        for c in range(10):
            members = np.flatnonzero(self._labels == c)
            if len(members) < needed:
                raise DataError(
                    f"digits: class {c} has {len(members)} images, fewer than the "
                    f"{needed} requested per class (digits_train_per_class={per_class['train']} + "
                    f"digits_val_per_class={per_class['val']} + "
                    f"digits_test_per_class={per_class['test']}); the smallest class has "
                    f"{np.bincount(self._labels).min()} images.")
            members = rng.permutation(members)
            start = 0
            for name in self.SPLITS:
                chosen[name].append(members[start:start + per_class[name]])
                start += per_class[name]
        self._split_ids = {name: np.sort(np.concatenate(ids)) for name, ids in chosen.items()}

    def split_ids(self, split: str) -> np.ndarray:
        """Positions in ``sklearn.datasets.load_digits()`` of the split's images, int64 [n]."""
        ids = []
        for name, lo, hi in parse_split(split):
            name = "val" if name == "validation" else name
            if name not in self._split_ids:
                raise DataError(f"digits has no split {name!r}; use one of {self.SPLITS} "
                                f"(or a union such as 'train+val').")
            part = self._split_ids[name]
            start, stop = slice_bounds(len(part), lo, hi)
            ids.append(part[start:stop])
        return np.concatenate(ids).astype(np.int64)

    def info(self, split: str) -> SplitInfo:
        return SplitInfo(len(self.split_ids(split)), 10, tuple(str(c) for c in range(10)))

    def element_fn(self, split: str):
        ids = self.split_ids(split)
        images = tf.constant(self._images[ids][..., None])  # [n, 8, 8, 1], 0..16.
        labels = tf.constant(self._labels[ids])
        size = self._size

        def element(index):
            small = tf.gather(images, index)
            big = tf.image.resize(small, [size, size], method="bilinear")
            big = tf.clip_by_value(tf.round(big * (255.0 / 16.0)), 0.0, 255.0)
            image = tf.repeat(tf.cast(big, tf.uint8), 3, axis=-1)
            return {"image": image, "label": tf.gather(labels, index),
                    "index": tf.cast(index, tf.int64)}

        return element

