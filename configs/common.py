"""What the config files share: preset dispatch, stage lengths, the classification section and
the data + model settings of the digits, VIPriors and runlocal presets.

A config file lists its presets as small functions, ``PRESETS = {'name': fn}``, each returning
a whole ConfigDict, and its ``get_config(arg)`` is ``common.get_preset(PRESETS, arg, ...)``.
"""
from __future__ import annotations

from typing import Callable

import ml_collections

Preset = Callable[[], ml_collections.ConfigDict]

DIGITS_IMAGE_SIZE = 32  # Pixels the 8x8 digits are upsampled to (digits presets).
DIGITS_WIDTH = 0.125  # ResNet-18 width multiplier of the digits presets (8..64 channels).


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


def digits_data_and_model(config) -> None:
    """The embedded digits at DIGITS_IMAGE_SIZE px and the backbone every digits preset shares.

    Digits are 8x8, upsampled bilinearly. 32 px, not 16: with the small stem a ResNet-18 ends
    at 1/8 of its input, so 16 px leaves a 2x2 last stage, and Phase 1 on it did not learn on
    val (its embeddings collapsed: mean cosine of the negatives rose to 0.9+ and the k-NN stayed
    at the untrained encoder's ~61% in every lr / crop / margin / BN-group setting tried); 32 px
    (4x4) learns. Width DIGITS_WIDTH keeps a 32-px step about as cheap as the old 16-px one
    at width 0.25 (FLOPs scale with pixels x width^2). Global batch 64.
    """
    config.input.source = "digits"
    config.input.digits_image_size = DIGITS_IMAGE_SIZE
    config.input.image_size = DIGITS_IMAGE_SIZE
    config.model.name = "resnet18"
    config.model.width_multiplier = DIGITS_WIDTH
    config.model.small_stem = True
    config.batch_size = 64


def vipriors_data_and_model(config) -> None:
    """The paper's classification setting (classify / distill presets): ResNet-50 at 224 px in
    bf16 compute (fp32 params, BN statistics and losses), batch 256, 100 epochs, on the
    VIPriors folder built by ``python -m dvp_jax.input.vipriors``."""
    config.input.source = "folder:data/vipriors"
    config.input.augment_on = "device"  # The host only decodes: 224 px views made on the GPUs.
    config.model.dtype = "bfloat16"
    config.input.image_size = 224
    config.model.name = "resnet50"
    config.batch_size = 256
    config.num_epochs = 100.0
    config.loop.checkpoint_every_steps = 2000
    config.loop.log_every_steps = 100
    config.loop.eval_every_epochs = 10.0


def runlocal_data_and_model(config) -> None:
    """The smoke-test size every ``runlocal`` preset shares: 64 synthetic 16-px images,
    ResNet-18 at width 0.125 with the small stem, batch 16, 2 epochs, checkpoints every 4
    steps, no periodic evaluation."""
    config.input.source = "synthetic"
    config.input.synthetic_num_examples = 64
    config.input.image_size = 16
    config.model.name = "resnet18"
    config.model.width_multiplier = 0.125
    config.model.small_stem = True
    config.batch_size = 16
    config.num_epochs = 2.0
    config.loop.checkpoint_every_steps = 4
    config.loop.log_every_steps = 2
    config.loop.eval_every_epochs = 0.0
