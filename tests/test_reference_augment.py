"""The DVP code release's augmentations: AutoAugment 'cifar10_released' and Cutout.

Numbers encode the released code's behaviour (sup_train_distill/autoaug.py): magnitude bin i of
10 is U(edges[i], edges[i+1]), edges = linspace(lo, hi, 11); geometric ops go through
scipy.ndimage.affine_transform (cubic, black fill) in (row, column) coordinates.
"""
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from dvp_jax import config_base
from dvp_jax.input import augment, autoaugment

N = 200


def _draws(op, bin_index, n=N):
    return np.array([float(autoaugment.released_magnitude(op, bin_index, tf.constant([i, 5])))
                     for i in range(n)])


@pytest.mark.parametrize("op,bin_index,lo,hi", [
    ("Solarize", 2, 51.2, 76.8), ("Posterize", 7, 6.8, 7.2), ("Color", 0, 0.1, 0.28),
    ("Brightness", 0, 0.1, 0.28), ("Rotate", 2, -18.0, -12.0), ("ShearX", 8, 0.18, 0.24),
    ("ShearY", 7, 0.12, 0.18), ("TranslateY", 9, 120 / 331, 150 / 331), ("Contrast", 6, 1.18, 1.36),
    ("Sharpness", 1, 0.28, 0.46), ("TranslateX", 3, -60 / 331, -30 / 331)])
def test_released_magnitude_ranges_per_bin(op, bin_index, lo, hi):
    assert autoaugment.released_range(op, bin_index) == pytest.approx((lo, hi))
    d = _draws(op, bin_index)
    assert d.min() >= lo - 1e-6 and d.max() <= hi + 1e-6
    assert d.min() < lo + 0.1 * (hi - lo) and d.max() > hi - 0.1 * (hi - lo)  # Uniform, no sign.


def test_released_colour_ops_apply_the_drawn_value():
    ramp = tf.constant(np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (2, 1, 3)))
    for i in range(20):
        t = autoaugment.released_magnitude("Solarize", 2, tf.constant([i, 1]))
        out = autoaugment.RELEASED_OPS["Solarize"](ramp, t).numpy()[0, :, 0]
        first_inverted = int(np.argmax(out != np.arange(256)))
        assert 51 <= first_inverted <= 77 and first_inverted == int(np.ceil(float(t)))
        bits = autoaugment.released_magnitude("Posterize", 7, tf.constant([i, 1]))
        out = autoaugment.RELEASED_OPS["Posterize"](ramp, bits).numpy()
        assert np.array_equal(out, ramp.numpy() & 0xFE)  # Always 7 bits.
        f = autoaugment.released_magnitude("Brightness", 0, tf.constant([i, 1]))
        grey = tf.fill([4, 4, 3], tf.constant(200, tf.uint8))
        value = int(autoaugment.RELEASED_OPS["Brightness"](grey, f).numpy()[0, 0, 0])
        assert 20 <= value <= 56 and value == int(round(200 * float(f)))


def _smooth(h=24, w=24):
    y, x = np.mgrid[:h, :w].astype(np.float64)
    img = 128 + 60 * np.sin(x / 5.0) + 50 * np.cos(y / 4.0 + x / 9.0)
    return np.clip(np.stack([img, img[::-1], img[:, ::-1]], -1), 0, 255).astype(np.uint8)


def _scipy(img, matrix_rc, offset_rc=(0.0, 0.0)):
    """The released code's warp: input (r, c) = centre + M (out - centre) + offset, cubic,
    black fill (with the true centre (n - 1) / 2, see docs/METHOD.md)."""
    centre = (np.array(img.shape[:2]) - 1) / 2.0
    m = np.asarray(matrix_rc, np.float64)
    offset = centre - m @ centre + np.asarray(offset_rc)
    return np.stack([ndimage.affine_transform(img[..., c].astype(np.float64), m, offset, order=3,
                                              mode="constant", cval=0.0)
                     for c in range(3)], -1)


@pytest.mark.parametrize("op,value", [("Rotate", -15.0), ("Rotate", 25.0), ("ShearX", 0.2),
                                      ("ShearY", -0.25)])
def test_released_geometric_ops_match_scipy_directions(op, value):
    img = _smooth()
    ours = autoaugment.RELEASED_OPS[op](tf.constant(img), value).numpy().astype(float)
    if op == "Rotate":
        a = np.deg2rad(value)
        m = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    elif op == "ShearX":
        m = [[1.0, value], [0.0, 1.0]]
    else:
        m = [[1.0, 0.0], [value, 1.0]]
    ref = _scipy(img, m)
    interior = (slice(4, -4), slice(4, -4))
    err = np.abs(ours - ref)[interior].mean()
    assert err < 2.0, err  # Keys cubic vs cubic B-spline on a smooth image.
    mirrored = _scipy(img, np.array(m).T if op == "Rotate" else np.array(m)[::-1, ::-1])
    assert np.abs(ours - mirrored)[interior].mean() > 5 * err  # The other direction is far.


def test_released_translate_reads_the_input_at_plus_t_with_black_fill():
    img = _smooth(20, 30)
    out = autoaugment.RELEASED_OPS["TranslateX"](tf.constant(img), 3 / 30).numpy()
    assert np.array_equal(out[:, :-3], img[:, 3:]) and (out[:, -3:] == 0).all()
    out = autoaugment.RELEASED_OPS["TranslateY"](tf.constant(img), -4 / 20).numpy()
    assert np.array_equal(out[4:], img[:-4]) and (out[:4] == 0).all()


def test_cutout_side_and_mean_grey_fill():
    """Side res // 4 (the reference's Cutout(length=input_res // 4)), filled with the image's
    mean grey (one value over all pixels and channels), before normalisation."""
    c = config_base.input_config("digits", image_size=32)
    c.mean, c.std = (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)  # Normalised = 0..255 values.
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.float32)
    x = tf.constant(img)
    for i in range(10):
        out = augment.cutout(x, tf.constant([i, 2]), 32 // 4).numpy()
        changed = (out != img).any(-1)
        rows, cols = np.where(changed)
        assert 1 <= rows.max() - rows.min() + 1 <= 8 and 1 <= cols.max() - cols.min() + 1 <= 8
        assert np.allclose(out[changed], img.mean(), atol=1e-3)
        assert changed.sum() >= 16  # At least a quarter of the 8x8 square stays inside.
    inside = [(augment.cutout(x, tf.constant([i, 2]), 8).numpy() != img).any(-1).sum()
              for i in range(40)]
    assert max(inside) == 64  # Unclipped squares are exactly 8 x 8.
