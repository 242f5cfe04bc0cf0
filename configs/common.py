"""What the config files share: preset dispatch, stage lengths and the classification section.

A config file lists its presets as small functions, ``PRESETS = {'name': fn}``, each returning
a whole ConfigDict, and its ``get_config(arg)`` is ``common.get_preset(PRESETS, arg, ...)``.
"""
from __future__ import annotations

from typing import Callable

import ml_collections

Preset = Callable[[], ml_collections.ConfigDict]


def get_preset(presets: dict[str, Preset], arg: str, *, default: str,
               filename: str) -> ml_collections.ConfigDict:
    """The config of preset ``arg`` (``default`` when empty); an unknown name raises ValueError
    listing the allowed ones ("...; allowed: a, b, c.")."""
    preset = arg or default
    if preset not in presets:
        raise ValueError(f"Unknown preset {preset!r} for configs/{filename}; "
                         f"allowed: {', '.join(presets)}.")
    return presets[preset]()


def classify_section() -> ml_collections.ConfigDict:
    """The classification settings Phase 2 shares with the classification trainers."""
    c = ml_collections.ConfigDict()
    c.label_smoothing = 0.0  # CE target (1 - e) * onehot + e / N.
    # Mixup's Beta(alpha, alpha); 0 = off. The DVP release's --mixup is 1.0 (Phase 2: the
    # teacher distils on the mixed images too).
    c.mixup_alpha = 0.0
    return c


def set_epochs(stage: ml_collections.ConfigDict, epochs: float) -> None:
    """Sets a stage's length; step schedules keep their decay points at the same fractions."""
    old = stage.num_epochs
    stage.num_epochs = epochs
    if "optim" in stage and stage.optim.schedule == "step":
        stage.optim.decay_epochs = tuple(e * epochs / old for e in stage.optim.decay_epochs)
