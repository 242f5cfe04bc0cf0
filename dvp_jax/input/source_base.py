"""The two kinds of source (see ``dvp_jax.input.sources`` for the elements they yield).

  * ``Source``: streams a split's elements for one process's shard (``dataset``).
  * ``IndexedSource``: element ``i`` of a split can be loaded on its own (``element_fn``), so
    the train pipeline shuffles the whole split cheaply by permuting indices, and resumes by
    skipping indices before any decoding.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import tensorflow as tf

from dvp_jax.input.splits import shard_bounds

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    num_examples: int  # Examples in the whole split (all processes together).
    num_classes: int
    class_names: tuple[str, ...]


class Source:
    """One kind of data; see ``dvp_jax.input.sources`` for the elements it yields."""

    def info(self, split: str) -> SplitInfo:
        raise NotImplementedError

    def dataset(self, split: str, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
        raise NotImplementedError


class IndexedSource(Source):
    """A source whose split elements can be loaded one by one from their index."""

    # True when loading may fail at run time (files): the pipelines then drop failing elements.
    may_fail_at_runtime = False

    def element_fn(self, split: str) -> Callable[[tf.Tensor], dict]:
        """f(index: int64 []) -> element dict (see ``dvp_jax.input.sources``), usable in tf.data."""
        raise NotImplementedError

    def dataset(self, split: str, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
        n = self.info(split).num_examples
        start, stop = shard_bounds(n, process_index, process_count)
        ds = tf.data.Dataset.range(start, stop).map(
            tf.autograph.experimental.do_not_convert(self.element_fn(split)),
            num_parallel_calls=AUTOTUNE, deterministic=True)
        if self.may_fail_at_runtime:
            ds = ds.ignore_errors(log_warning=True)
        return ds

