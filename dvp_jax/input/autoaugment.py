"""AutoAugment (Cubuk et al. 2019) on uint8 [H, W, 3] images, stateless.

Three policies (``input.auto_augment``):
  'imagenet', 'cifar10'  torchvision's ``AutoAugmentPolicy.IMAGENET`` / ``.CIFAR10`` (the paper's
      policies) with torchvision's magnitude bins: a sub-policy is drawn uniformly, then each
      of its two ops runs with its probability; signed magnitudes get a random sign. Geometric
      ops use nearest-neighbour sampling and fill uncovered pixels with grey 128 (the paper's
      TF code and DeepVoltaire's PyTorch port; torchvision's default fill is 0).
  'cifar10_released'  the variant in the DVP code release (its ``autoaug.py``, used by the
      tricks stack): the same 25 CIFAR-10 sub-policies, but each magnitude is drawn uniformly
      inside bin i of 10 equal bins spanning the op's range (``RELEASED_RANGES``; no random
      sign: e.g. Rotate bin 2 = -18..-12 degrees, Solarize bin 2 = threshold 51.2..76.8,
      Posterize bin 7 = round(U(6.8, 7.2)) = 7 bits, Color/Brightness bin 0 = factor
      0.1..0.28); geometric ops are bicubic about the image centre with black (0) fill.
Colour ops round to the nearest integer (PIL) where torchvision's tensor path truncates. Every
op maps uint8 [H, W, 3] -> uint8 [H, W, 3].
"""
from __future__ import annotations

import math

import tensorflow as tf

FILL = 128.0
NUM_BINS = 10

POLICIES = {
    "imagenet": (
        (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
        (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
        (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
        (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
        (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
        (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
        (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
        (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
        (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
        (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
        (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
        (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
        (("Color", 0.4, 0), ("Equalize", 0.6, None)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    ),
    "cifar10": (
        (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
        (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
        (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
        (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
        (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
        (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
        (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
        (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
        (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
        (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
        (("Color", 0.9, 9), ("Equalize", 0.6, None)),
        (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
        (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
        (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
        (("Equalize", 0.8, None), ("Invert", 0.1, None)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
    ),
}

POLICIES["cifar10_released"] = POLICIES["cifar10"]  # Same sub-policies, other magnitudes.
RELEASED = ("cifar10_released",)

# The released code's magnitude ranges: bin i of 10 is U(edges[i], edges[i + 1]) with
# edges = linspace(lo, hi, 11). Translations are fractions of the image side; colour ops are
# PIL enhance factors (1 = unchanged); Posterize is rounded to whole bits.
RELEASED_RANGES = {
    "ShearX": (-0.3, 0.3), "ShearY": (-0.3, 0.3),
    "TranslateX": (-150 / 331, 150 / 331), "TranslateY": (-150 / 331, 150 / 331),
    "Rotate": (-30.0, 30.0), "Solarize": (0.0, 256.0), "Posterize": (4.0, 8.0),
    "Contrast": (0.1, 1.9), "Color": (0.1, 1.9), "Brightness": (0.1, 1.9),
    "Sharpness": (0.1, 1.9),
}

SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
          "Contrast", "Sharpness"}


def magnitude(op: str, bin_index: int | None, height, width):
    """torchvision's magnitude of ``op`` at ``bin_index`` of 10 (before the random sign)."""
    if bin_index is None:
        return 0.0
    t = bin_index / (NUM_BINS - 1)
    if op in ("ShearX", "ShearY"):
        return 0.3 * t
    if op == "TranslateX":  # Pixels; int() as torchvision.
        return tf.floor(150.0 / 331.0 * tf.cast(width, tf.float32) * t)
    if op == "TranslateY":
        return tf.floor(150.0 / 331.0 * tf.cast(height, tf.float32) * t)
    if op == "Rotate":
        return 30.0 * t
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return 0.9 * t
    if op == "Posterize":  # Bits kept: 8 - round(i / 2.25) = 8, 8, 7, 7, 6, 6, 5, 5, 4, 4.
        return float((8, 8, 7, 7, 6, 6, 5, 5, 4, 4)[bin_index])
    if op == "Solarize":  # Threshold 255 -> 0.
        return 255.0 * (1.0 - t)
    return 0.0


def released_range(op: str, bin_index: int) -> tuple[float, float]:
    """(low, high) of the released code's magnitude of ``op`` in bin ``bin_index`` (0..9)."""
    lo, hi = RELEASED_RANGES[op]
    step = (hi - lo) / NUM_BINS
    return lo + step * bin_index, lo + step * (bin_index + 1)


def released_magnitude(op: str, bin_index: int | None, seed) -> tf.Tensor:
    """A draw U(released_range(op, bin_index)) (float32 scalar); 0 for ops without one."""
    if bin_index is None or op not in RELEASED_RANGES:
        return tf.constant(0.0)
    lo, hi = released_range(op, bin_index)
    return tf.random.stateless_uniform([], seed, minval=lo, maxval=hi)


# ----------------------------------------------------------------------------------------------
# Ops: uint8 [H, W, 3], magnitude (float scalar) -> uint8 [H, W, 3].

def _to_u8(x):
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _blend(degenerate, image, factor):
    """PIL ImageEnhance: degenerate + factor * (image - degenerate), rounded, clipped."""
    image = tf.cast(image, tf.float32)
    return _to_u8(degenerate + factor * (image - degenerate))


def _gray(image):
    x = tf.cast(image, tf.float32)
    return tf.reduce_sum(x * tf.constant((0.299, 0.587, 0.114)), axis=-1, keepdims=True)


def _transform(image, matrix):
    """Projective warp; ``matrix`` (8 floats) maps output (x, y) to input coordinates."""
    shape = tf.shape(image)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=tf.reshape(tf.cast(tf.stack(matrix), tf.float32), [1, 8]),
        output_shape=shape[:2], fill_value=FILL, interpolation="NEAREST", fill_mode="CONSTANT")
    return out[0]


def shear_x(image, m):
    return _transform(image, [1.0, m, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image, m):
    return _transform(image, [1.0, 0.0, 0.0, m, 1.0, 0.0, 0.0, 0.0])


def translate_x(image, m):
    return _transform(image, [1.0, 0.0, -m, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image, m):
    return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, -m, 0.0, 0.0])


def rotate(image, degrees):
    """Rotation about the image centre by ``degrees`` (counter-clockwise on screen)."""
    shape = tf.cast(tf.shape(image), tf.float32)
    cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    a = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    cos, sin = tf.cos(a), tf.sin(a)
    return _transform(image, [cos, -sin, cx - cos * cx + sin * cy,
                              sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])


def brightness(image, m):
    return _blend(0.0, image, 1.0 + m)


def color(image, m):
    return _blend(_gray(image), image, 1.0 + m)


def contrast(image, m):
    return _blend(tf.reduce_mean(_gray(image)), image, 1.0 + m)


def sharpness(image, m):
    """Blend with PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13); border pixels unchanged."""
    x = tf.cast(image, tf.float32)
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    shape = tf.shape(x)
    interior = tf.pad(tf.ones(shape - tf.constant([2, 2, 0])), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.round(interior * smooth + (1.0 - interior) * x)
    return _blend(degenerate, image, 1.0 + m)


def posterize(image, bits):
    shift = tf.cast(8 - tf.cast(bits, tf.int32), tf.uint8)
    return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image, threshold):
    return tf.where(tf.cast(image, tf.float32) >= threshold, 255 - image, image)


def auto_contrast(image, m=0.0):
    """Per channel: stretch [min, max] to [0, 255] (unchanged where max == min)."""
    x = tf.cast(image, tf.float32)
    lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
    scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1e-6), 1.0)
    lo = tf.where(hi > lo, lo, 0.0)
    return _to_u8((x - lo) * scale)


def _equalize_channel(channel):
    """PIL/torchvision equalize of one uint8 [H, W] channel."""
    values = tf.cast(channel, tf.int32)
    hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

    def equalized():
        lut = (tf.cumsum(hist) + step // 2) // step
        lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
        return tf.cast(tf.gather(lut, values), tf.uint8)

    return tf.cond(step > 0, equalized, lambda: channel)


def equalize(image, m=0.0):
    return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def invert(image, m=0.0):
    return 255 - image


def _cubic_weights(t):
    """Keys cubic-convolution weights (a = -0.5, PIL's bicubic) of the 4 taps at offsets
    -1, 0, 1, 2 from floor(x), for fractional part ``t`` [...] -> 4 arrays [...]."""
    a = -0.5

    def near(d):  # |d| <= 1
        return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1

    def far(d):  # 1 < |d| < 2
        return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def affine_bicubic(image, matrix):
    """Bicubic affine warp with black fill, as scipy.ndimage.affine_transform(order=3,
    mode='constant', cval=0) does (Keys cubic convolution here, a cubic B-spline there).

    ``matrix`` (6 floats) maps each output pixel (x, y) to the input point
    (m0 x + m1 y + m2, m3 x + m4 y + m5); points outside [0, W-1] x [0, H-1] are black.
    uint8 [H, W, 3] -> uint8 [H, W, 3].
    """
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    m = [tf.cast(v, tf.float32) for v in matrix]
    ys, xs = tf.meshgrid(tf.range(h, dtype=tf.float32), tf.range(w, dtype=tf.float32),
                         indexing="ij")
    xi = m[0] * xs + m[1] * ys + m[2]
    yi = m[3] * xs + m[4] * ys + m[5]
    wf, hf = tf.cast(w - 1, tf.float32), tf.cast(h - 1, tf.float32)
    eps = 1e-3
    inside = (xi >= -eps) & (xi <= wf + eps) & (yi >= -eps) & (yi <= hf + eps)
    x0, y0 = tf.floor(xi), tf.floor(yi)
    wx, wy = _cubic_weights(xi - x0), _cubic_weights(yi - y0)
    x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
    src = tf.cast(image, tf.float32)
    out = tf.zeros(tf.concat([shape[:2], [3]], 0), tf.float32)
    for j in range(4):
        rows = tf.clip_by_value(y0 + j - 1, 0, h - 1)
        for i in range(4):
            cols = tf.clip_by_value(x0 + i - 1, 0, w - 1)
            taps = tf.gather_nd(src, tf.stack([rows, cols], axis=-1))
            out += (wy[j] * wx[i])[..., None] * taps
    return _to_u8(tf.where(inside[..., None], out, 0.0))


def _about_centre(image, a, b, c, d, tx=0.0, ty=0.0):
    """affine_bicubic with input = centre + [[a, b], [c, d]] (output - centre) + (tx, ty)."""
    shape = tf.cast(tf.shape(image), tf.float32)
    cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    return affine_bicubic(image, [a, b, cx - a * cx - b * cy + tx,
                                  c, d, cy - c * cx - d * cy + ty])


# The released code's geometric ops, in its (row, column) convention rewritten in (x, y):
# its ShearX moves rows by m * column (a vertical shear), its ShearY columns by m * row, its
# translations read the input at +t pixels, and its rotation by theta is ours by -theta.
def released_shear_x(image, m):
    return _about_centre(image, 1.0, 0.0, m, 1.0)


def released_shear_y(image, m):
    return _about_centre(image, 1.0, m, 0.0, 1.0)


def released_translate_x(image, fraction):
    return _about_centre(image, 1.0, 0.0, 0.0, 1.0,
                         tx=fraction * tf.cast(tf.shape(image)[1], tf.float32))


def released_translate_y(image, fraction):
    return _about_centre(image, 1.0, 0.0, 0.0, 1.0,
                         ty=fraction * tf.cast(tf.shape(image)[0], tf.float32))


def released_rotate(image, degrees):
    a = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    cos, sin = tf.cos(a), tf.sin(a)
    return _about_centre(image, cos, sin, -sin, cos)


RELEASED_OPS = {
    "ShearX": released_shear_x, "ShearY": released_shear_y,
    "TranslateX": released_translate_x, "TranslateY": released_translate_y,
    "Rotate": released_rotate,
    # PIL enhance factors f: ours take f - 1.
    "Brightness": lambda image, f: brightness(image, f - 1.0),
    "Color": lambda image, f: color(image, f - 1.0),
    "Contrast": lambda image, f: contrast(image, f - 1.0),
    "Sharpness": lambda image, f: sharpness(image, f - 1.0),
    "Posterize": lambda image, bits: posterize(image, tf.round(bits)),  # Half to even, as round().
    "Solarize": lambda image, threshold: solarize(image, threshold),
}

OPS = {
    "ShearX": shear_x, "ShearY": shear_y, "TranslateX": translate_x, "TranslateY": translate_y,
    "Rotate": rotate, "Brightness": brightness, "Color": color, "Contrast": contrast,
    "Sharpness": sharpness, "Posterize": posterize, "Solarize": solarize,
    "AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert,
}


# ----------------------------------------------------------------------------------------------

def apply_subpolicy(image: tf.Tensor, policy: str, index: int, seed, *, force: bool = False):
    """Sub-policy ``index`` of ``policy`` on uint8 [H, W, 3] -> uint8 [H, W, 3].

    Each op runs with its probability (always when ``force``). torchvision policies: signed
    magnitudes get a random sign; released policies: the magnitude is drawn inside its bin.
    """
    shape = tf.shape(image)
    seeds = tf.random.experimental.stateless_split(seed, num=4)
    released = policy in RELEASED
    for k, (op, prob, bin_index) in enumerate(POLICIES[policy][index]):
        if released:
            m = released_magnitude(op, bin_index, seeds[2 * k + 1])
            fn = RELEASED_OPS.get(op, OPS[op])
        else:
            m = tf.cast(magnitude(op, bin_index, shape[0], shape[1]), tf.float32)
            if op in SIGNED:
                negative = tf.random.stateless_uniform([], seeds[2 * k + 1]) < 0.5
                m = tf.where(negative, -m, m)
            fn = OPS[op]
        apply = (tf.constant(True) if force
                 else tf.random.stateless_uniform([], seeds[2 * k]) < prob)
        image = tf.cond(apply, lambda fn=fn, m=m, image=image: fn(image, m),
                        lambda image=image: image)
        image = tf.ensure_shape(image, [None, None, 3])
    return image


def auto_augment(image: tf.Tensor, policy: str, seed) -> tf.Tensor:
    """AutoAugment ``policy`` ('imagenet' | 'cifar10' | 'cifar10_released') on uint8 [H, W, 3] -> uint8 [H, W, 3]."""
    choose_seed, apply_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    n = len(POLICIES[policy])
    choice = tf.random.stateless_uniform([], choose_seed, minval=0, maxval=n, dtype=tf.int32)
    branches = [lambda i=i: apply_subpolicy(image, policy, i, apply_seed) for i in range(n)]
    return tf.switch_case(choice, branches)
