"""The geometry of evaluation crops, as torchvision computes it: resize the shorter side to
round(S / crop_ratio), then a centre crop or torchvision's ten crops of side S (pixels).

Functions work on Python ints and on int32 tensors (inside tf.data graphs) alike.
"""
from __future__ import annotations

import tensorflow as tf


def _round_half_even(value):
    """Python's round() for ints/floats; tf.round (also half-to-even) for tensors."""
    if isinstance(value, (int, float)):
        return int(round(value))
    return tf.cast(tf.round(tf.cast(value, tf.float32)), tf.int32)


def resize_size(image_size: int, input_config) -> int:
    """Shorter side before the central crop: round(S / crop_ratio), e.g. 224 -> 256."""
    return int(round(image_size / float(input_config.get("crop_ratio", 0.875))))


def resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
    """Bilinear (antialiased) resize so min(H, W) = size; the long side = int(size * long / short)
    as torchvision's Resize(int). Returns float32 0..255 [H', W', 3]."""
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    short = tf.minimum(h, w)
    new_h = tf.where(h <= w, size, tf.cast(size * h / short, tf.int32))
    new_w = tf.where(h <= w, tf.cast(size * w / short, tf.int32), size)
    return tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=True)


def center_crop_box(height, width, size):
    """(top, left) of torchvision's CenterCrop: int(round((H - S) / 2)), int(round((W - S) / 2))."""
    return _round_half_even((height - size) / 2), _round_half_even((width - size) / 2)


def ten_crop_boxes(height, width, size) -> list:
    """The 10 (top, left) boxes of torchvision's TenCrop in the (resized) image's coordinates.

    Boxes 0..4: top-left, top-right, bottom-left, bottom-right, centre. Boxes 5..9 are
    torchvision's five crops of the horizontally flipped image, given here in the unflipped
    image's coordinates: crop k+5 = flip(crop of box k+5), i.e. flipped top-left (= the right
    edge), flipped top-right, flipped bottom-left, flipped bottom-right, flipped centre.
    Works on Python ints and on int32 tensors.
    """
    ct, cl = center_crop_box(height, width, size)
    five = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size), (ct, cl)]
    flipped = [(top, width - size - left) for top, left in five]
    return five + flipped
