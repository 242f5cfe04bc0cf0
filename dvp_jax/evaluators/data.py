"""Where an evaluation reads its examples: the input settings and the global batch.

``EvalData(input_config, global_batch)`` gives one pass over a split with an evaluation
transform (dvp_jax.input.pipeline.make_eval_iterator: host-local batches 'image', 'label',
'mask', padded at the end) and the split's size and number of classes.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax

from dvp_jax import errors, sharding

log = logging.getLogger("dvp_jax")


class EvaluationError(errors.UserError, ValueError):
    """The checkpoints, options or data asked for cannot be evaluated; the message says why."""


def split_info(input_config, split: str):
    """The source's SplitInfo of ``split`` (num_examples, num_classes)."""
    from dvp_jax.input import sources
    return sources.get_source(input_config).info(split)


@dataclasses.dataclass(frozen=True)
class EvalData:
    """input_config: the input section (ConfigDict: source, image_size, ...).
    global_batch: images per evaluation step over all processes (a multiple of the devices).
    offline: the data was chosen on the command line, so an unusable split (e.g. one that
      yields no batches) is the user's mistake: raised as EvaluationError naming the split and
      source. In the training loop (False) it stays a plain ValueError (a bug).
    """
    input_config: Any
    global_batch: int
    offline: bool = False

    @property
    def image_size(self) -> int:
        """S: the crop resolution fed to the network (pixels)."""
        return int(self.input_config.image_size)

    def batches(self, split: str, transform: str = "eval_center"):
        """One pass over ``split`` with ``transform`` ('eval_center' [B, S, S, 3] images,
        'ten_crop' [B, 10, S, S, 3])."""
        from dvp_jax.input import pipeline
        return pipeline.make_eval_iterator(self.input_config, split, transform,
                                           global_batch=self.global_batch,
                                           image_size=self.image_size)

    def info(self, split: str):
        """The SplitInfo of ``split`` (num_examples, num_classes)."""
        return split_info(self.input_config, split)


def global_batch_for(batch_size: int, mesh) -> int:
    """``batch_size`` rounded up to a multiple of the data shards and of the processes."""
    unit = math.lcm(sharding.num_data_shards(mesh), jax.process_count())
    rounded = max(unit, -(-int(batch_size) // unit) * unit)
    if rounded != batch_size:
        log.info("evaluation batch %d rounded up to %d (a multiple of %d devices/processes)",
                 batch_size, rounded, unit)
    return rounded
