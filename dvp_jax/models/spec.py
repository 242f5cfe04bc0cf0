"""ModelSpec: a frozen, JSON-able description of a model (name + options) that builds it.

    spec = ModelSpec.from_config(config.model, projection_dims=(512, 128), bn_groups=8)
    model = spec.build()                       # = models.build(spec.name, **options)
    meta = {"model": spec.to_meta()}           # what a checkpoint records
    ModelSpec.from_meta(meta["model"]) == spec # True: it round-trips

Trainers, the evaluator, the benchmark and checkpoint loading all describe models this way,
so a checkpoint's metadata rebuilds exactly the model that wrote it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from dvp_jax import models

FIELDS = ("name", "num_classes", "projection_dims", "bn_groups", "small_stem",
          "width_multiplier", "dtype", "zero_init_residual", "variant")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Arguments of ``models.build`` (see it for their meaning).

    name: a model name of ``models.NAMES``; num_classes: classifier outputs (0: none);
    projection_dims: MLP head widths (empty: none); bn_groups: split-BN groups (1: plain BN);
    small_stem, width_multiplier, dtype ('float32' | 'bfloat16'), zero_init_residual, variant
    ('torchvision' | 'seed_distill').
    """
    name: str
    num_classes: int = 0
    projection_dims: tuple[int, ...] = ()
    bn_groups: int = 1
    small_stem: bool = False
    width_multiplier: float = 1.0
    dtype: str = "float32"
    zero_init_residual: bool = False
    variant: str = "torchvision"

    def __post_init__(self):
        # Canonical types, so that equal specs compare equal whatever they were made from
        # (ConfigDict values, JSON lists, numpy scalars).
        for key, cast in (("name", str), ("num_classes", int), ("bn_groups", int),
                          ("small_stem", bool), ("width_multiplier", float), ("dtype", str),
                          ("zero_init_residual", bool), ("variant", str)):
            object.__setattr__(self, key, cast(getattr(self, key)))
        object.__setattr__(self, "projection_dims",
                           tuple(int(d) for d in self.projection_dims))

    @classmethod
    def from_config(cls, model_config: Any, **options) -> ModelSpec:
        """``config.model`` (name, small_stem, width_multiplier, dtype, zero_init_residual,
        variant) plus what the trainer adds (num_classes, projection_dims, bn_groups)."""
        values = {key: model_config[key] for key in FIELDS if key in model_config}
        values.update(options)
        return cls(**values)

    @classmethod
    def from_meta(cls, meta: dict) -> ModelSpec:
        """The spec a checkpoint recorded (``to_meta``'s dict; absent keys take defaults)."""
        unknown = sorted(set(meta) - set(FIELDS))
        if unknown:
            raise ValueError(f"model metadata has unknown keys {unknown}; known: "
                             f"{', '.join(FIELDS)}.")
        return cls(**meta)

    def to_meta(self) -> dict:
        """JSON-able dict of every field (projection_dims as a list)."""
        meta = dataclasses.asdict(self)
        meta["projection_dims"] = list(self.projection_dims)
        return meta

    def replace(self, **changes) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    def build(self) -> nn.Module:
        """The Flax module (``models.build(self.name, **the other fields)``)."""
        options = {key: getattr(self, key) for key in FIELDS if key != "name"}
        return models.build(self.name, **options)
