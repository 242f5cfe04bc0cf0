"""Decoding encoded images with a cap on their size, read from the header before decoding.

Decompression bombs: ``decode_image_bytes`` refuses images whose header says more than
``max_pixels`` pixels (``input.max_image_pixels``); the folder source skips and counts such
files, the TFDS sources drop them like undecodable records.
"""
from __future__ import annotations

import tensorflow as tf

DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # input.max_image_pixels: 120 MB as decoded RGB uint8.


def _header_bytes(data: tf.Tensor, n: int = 32) -> tf.Tensor:
    """The first ``n`` bytes of ``data`` (zero-padded) as int64 [n]."""
    head = tf.strings.substr(tf.strings.join([data, tf.constant(b"\0" * n)]), 0, n)
    return tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)


def encoded_image_pixels(data: tf.Tensor) -> tf.Tensor:
    """Width x height (int64 []) of encoded JPEG / PNG / GIF / BMP / WebP bytes, read from the
    header without decoding; -1 for other or unparsable data (the decoder then decides)."""
    b = _header_bytes(data)

    def le(i, k):
        return sum(b[i + j] * (256 ** j) for j in range(k))

    def be(i, k):
        return sum(b[i + j] * (256 ** (k - 1 - j)) for j in range(k))

    def magic(i, text):
        return tf.reduce_all(tf.equal(b[i:i + len(text)], tf.constant(list(text), tf.int64)))

    bmp_h = le(22, 4)
    bmp_h = tf.abs(tf.where(bmp_h >= 2 ** 31, bmp_h - 2 ** 32, bmp_h))
    vp8l_w = 1 + ((b[22] % 64) * 256 + b[21])
    vp8l_h = 1 + ((b[24] % 16) * 1024 + b[23] * 4 + b[22] // 64)
    webp = magic(0, b"RIFF") & magic(8, b"WEBP")
    pixels = tf.constant(-1, tf.int64)
    pixels = tf.where(magic(0, b"\x89PNG"), be(16, 4) * be(20, 4), pixels)
    pixels = tf.where(magic(0, b"GIF8"), le(6, 2) * le(8, 2), pixels)
    pixels = tf.where(magic(0, b"BM"), le(18, 4) * bmp_h, pixels)
    pixels = tf.where(webp & magic(12, b"VP8X"), (le(24, 3) + 1) * (le(27, 3) + 1), pixels)
    pixels = tf.where(webp & magic(12, b"VP8 "), (le(26, 2) % 16384) * (le(28, 2) % 16384), pixels)
    pixels = tf.where(webp & magic(12, b"VP8L"), vp8l_w * vp8l_h, pixels)
    return tf.cond(magic(0, b"\xff\xd8"),
                   lambda: tf.reduce_prod(tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64)),
                   lambda: pixels)


def decode_image_bytes(data: tf.Tensor, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> uint8 [H, W, 3] (gray, RGBA, CMYK, 16-bit -> RGB).

    An image whose header says more than ``max_pixels`` pixels (a decompression bomb: a 62 kB
    PNG can hold 64 M pixels = 192 MB decoded) raises InvalidArgumentError before decoding;
    pipelines drop such elements like any undecodable one.
    """
    pixels = encoded_image_pixels(data)
    check = tf.debugging.assert_less_equal(
        pixels, tf.constant(int(max_pixels), tf.int64),
        message=f"image larger than input.max_image_pixels={int(max_pixels)}")
    with tf.control_dependencies([check]):
        image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image

