"""The host-side input pipeline (tf.data on the CPU): sources, augmentations, batching.

Importing this subpackage imports TensorFlow and hides every GPU and TPU from it, so that
TensorFlow never claims accelerator memory that JAX needs. Nothing outside ``dvp_jax/input``
imports TensorFlow (except the training loop, which imports this package), so models, train
steps and on-device synthetic benchmarks run where TensorFlow is not installed.

Modules:
  sources     -- where examples come from: ``get_source`` dispatches on input.source to
                 source_digits, source_synthetic, source_tfds (tfds:NAME) or source_folder
                 (folder:PATH); shared pieces in source_base, splits and decode.
  augment     -- a registry of per-example transforms (moco_v2, train_crop_flip, eval_center,
                 ten_crop), stateless: each output is a pure function of (image, seed).
  eval_crops  -- the geometry of evaluation crops (resize, centre crop, ten crops).
  autoaugment -- AutoAugment's ImageNet and CIFAR-10 policies on uint8 images.
  pipeline    -- deterministic, resumable train iterators and padded eval iterators.
  device_augment -- input.augment_on='device': the MoCo v2 and crop+flip views in jax.numpy,
                 made inside the train step on each device's shard (imports no TensorFlow:
                 it also imports where TensorFlow is not installed).
  vipriors    -- builds the VIPriors ImageNet subset (``python -m dvp_jax.input.vipriors``).
  throughput  -- measures the pipeline's images/s.
"""
from __future__ import annotations

try:
    import tensorflow as tf
except ImportError:  # Only device_augment works then; the tf.data modules need TensorFlow.
    tf = None


def _hide_accelerators_from_tensorflow() -> None:
    """Makes TensorFlow see no GPU/TPU (it would otherwise reserve their memory)."""
    if tf is None:
        return
    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):  # Already initialised, or no such device type.
            pass


_hide_accelerators_from_tensorflow()
