"""Transforms: MoCo v2 decision rates, crop boxes, eval crops, AutoAugment sub-policies."""
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from dvp_jax import config_base
from dvp_jax.input import augment, autoaugment, eval_crops
from helpers import assert_moco_decision_rates

N_DRAWS = 2000


def _config(**overrides):
    c = config_base.input_config("digits", image_size=16)
    for key, value in overrides.items():
        setattr(c, key, value)
    return c


def _image(h=40, w=56, seed=0):
    return tf.constant(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _map_seeds(fn, n=N_DRAWS):
    """fn(seed int64 [2]) for seeds (i, 17), i < n, batched into numpy arrays."""
    ds = tf.data.Dataset.range(n).map(lambda i: fn(tf.stack([i, tf.constant(17, tf.int64)])))
    return next(iter(ds.batch(n).as_numpy_iterator()))


def test_moco_decision_rates():
    p = _map_seeds(augment.sample_moco_view_params)
    assert_moco_decision_rates(p)


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.08, 1.0)])
def test_random_resized_crop_box_ranges(scale):
    h, w = 240, 240  # Square, so that areas up to 1 fit the aspect range.
    top, left, ch, cw = _map_seeds(
        lambda s: augment.random_resized_crop_box(h, w, s, scale=scale))
    area = ch * cw / (h * w)
    # Rounding h and w moves the area by about (h + w) / 2 pixels: 0.004 of 57,600 here.
    assert area.min() >= scale[0] - 0.005 and area.max() <= 1.0
    assert area.min() < scale[0] + 0.02 and area.max() > 0.9  # The range is used.
    aspect = cw / ch
    assert aspect.min() >= 3 / 4 - 0.03 and aspect.max() <= 4 / 3 + 0.03
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + ch <= h).all() and (left + cw <= w).all()


def test_random_resized_crop_fallback_is_the_centre_crop():
    # A 10 x 1000 strip: no attempt fits, so the centre crop with ratio clipped to 4/3.
    box = [int(v) for v in augment.random_resized_crop_box(10, 1000, tf.constant([3, 4]),
                                                           scale=(0.9, 1.0))]
    assert box == [0, (1000 - 13) // 2, 10, 13]


def test_moco_views_differ_and_are_pure_functions_of_the_seed():
    f = augment.get_transform("moco_v2", _config(), image_size=16)
    image = _image()
    out = f(image, tf.constant([5, 6]))
    again = f(image, tf.constant([5, 6]))
    other = f(image, tf.constant([5, 7]))
    assert out["view1"].shape == out["view2"].shape == (16, 16, 3)
    assert out["view1"].dtype == tf.float32
    assert not np.allclose(out["view1"], out["view2"])
    assert np.array_equal(out["view1"], again["view1"]) and np.array_equal(out["view2"], again["view2"])
    assert not np.allclose(out["view1"], other["view1"])


def test_color_jitter_identity_factors_and_grayscale():
    x = tf.cast(_image(), tf.float32) / 255.0
    identity = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0,
                "jitter_order": tf.constant([3, 1, 0, 2])}
    assert np.allclose(augment.color_jitter(x, identity), x, atol=1e-5)
    desaturated = augment.color_jitter(x, dict(identity, saturation=0.0))
    assert np.allclose(desaturated[..., 0], desaturated[..., 1], atol=1e-6)


def numpy_gaussian_blur(x, sigma):
    """Reference: separable Gaussian, taps |t| <= ceil(3 sigma), reflect padding, [H, W, C]."""
    half = int(np.ceil(3 * sigma))
    taps = np.arange(-half, half + 1)
    k = np.exp(-taps ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    p = np.pad(x, [(half, half), (half, half), (0, 0)], mode="reflect")
    rows = sum(k[i] * p[i:i + x.shape[0]] for i in range(len(k)))
    return sum(k[i] * rows[:, i:i + x.shape[1]] for i in range(len(k)))


def test_gaussian_blur_kernel_is_sized_from_sigma_in_pixels():
    # 2 * ceil(3 sigma) + 1, capped by the image (largest odd side <= image size).
    assert augment.blur_kernel_size(2.0, 224) == 13
    assert augment.blur_kernel_size(2.0, 16) == 13
    assert augment.blur_kernel_size(0.5, 16) == 5
    assert augment.blur_kernel_size(0.1, 16) == 3
    assert augment.blur_kernel_size(2.0, 8) == 7
    x = tf.fill([9, 9, 3], 0.25)
    assert np.allclose(augment.gaussian_blur(x, 1.5, 9), 0.25, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.4, 1.3, 2.0])
def test_gaussian_blur_at_16px_matches_numpy_gaussian(sigma):
    """At 16 px (the digits preset) the blur is not a no-op and equals a numpy Gaussian of the
    same sigma in pixels (the old kernel, 10% of the image, was 1 tap: no blur at all)."""
    x = np.random.default_rng(0).uniform(size=(16, 16, 3)).astype(np.float32)
    y = augment.gaussian_blur(tf.constant(x), tf.constant(sigma), 16).numpy()
    assert np.abs(y - x).mean() > 0.02  # sigma 0.4: 0.043; sigma 2: about 0.2.
    np.testing.assert_allclose(y, numpy_gaussian_blur(x.astype(np.float64), sigma), atol=1e-5)


def test_ten_crop_boxes():
    boxes = eval_crops.ten_crop_boxes(256, 300, 224)
    five = [(0, 0), (0, 76), (32, 0), (32, 76), (16, 38)]
    assert boxes == five + [(0, 76), (0, 0), (32, 76), (32, 0), (16, 38)]
    as_tensors = eval_crops.ten_crop_boxes(tf.constant(256), tf.constant(300), 224)
    assert [(int(t), int(l)) for t, l in as_tensors] == boxes
    assert eval_crops.ten_crop_boxes(225, 227, 224)[4] == (0, 2)  # round(1.5) = 2, round(0.5) = 0.


def test_eval_center_and_ten_crop_outputs():
    c = _config()
    image = _image(30, 50)
    center = augment.get_transform("eval_center", c, image_size=16)(image, tf.constant([0, 0]))
    assert center["image"].shape == (16, 16, 3) and center["image"].dtype == tf.float32
    flat = tf.fill([30, 50, 3], tf.constant(51, tf.uint8))
    expected = (0.2 - np.array(c.mean)) / np.array(c.std)
    out = augment.get_transform("eval_center", c, image_size=16)(flat, tf.constant([0, 0]))
    assert np.allclose(out["image"], expected, atol=1e-4)

    ten = augment.get_transform("ten_crop", c, image_size=16)(image, tf.constant([0, 0]))["image"]
    assert ten.shape == (10, 16, 16, 3)
    resized = eval_crops.resize_shorter_side(image, eval_crops.resize_size(16, c)).numpy()
    assert resized.shape[:2] == (18, 30)  # round(16 / 0.875) = 18; int(18 * 50 / 30) = 30.
    boxes = eval_crops.ten_crop_boxes(18, 30, 16)
    for k, (top, left) in enumerate(boxes):
        crop = resized[top:top + 16, left:left + 16]
        crop = crop[:, ::-1] if k >= 5 else crop
        crop = (np.clip(crop, 0, 255) / 255.0 - np.array(c.mean)) / np.array(c.std)
        assert np.allclose(ten[k], crop, atol=1e-4), k
    assert np.allclose(ten[4], center["image"], atol=1e-4)


def test_train_crop_flip_with_autoaugment_and_cutout():
    c = _config(auto_augment="imagenet", cutout=6)
    f = augment.get_transform("train_crop_flip", c, image_size=16)
    outs = [f(_image(), tf.constant([i, 1]))["image"] for i in range(4)]
    assert all(o.shape == (16, 16, 3) and o.dtype == tf.float32 for o in outs)
    for o in outs:  # A cut-out square: one grey value (the same in the 3 unnormalised channels).
        raw = (o.numpy() * np.array(c.std) + np.array(c.mean)) * 255.0
        grey = np.abs(raw - raw[..., :1]).max(-1) < 1e-3
        assert grey.sum() >= 9
    with pytest.raises(ValueError, match="auto_augment"):
        augment.get_transform("train_crop_flip", _config(auto_augment="svhm"), image_size=16)
    with pytest.raises(ValueError, match="Unknown transform"):
        augment.get_transform("nope", c, image_size=16)


@pytest.mark.parametrize("policy", sorted(autoaugment.POLICIES))
def test_every_autoaugment_subpolicy_keeps_shape_and_dtype(policy):
    image = _image(20, 24)
    assert len(autoaugment.POLICIES[policy]) == 25
    for index in range(25):
        out = autoaugment.apply_subpolicy(image, policy, index, tf.constant([index, 3]), force=True)
        assert out.shape == image.shape and out.dtype == tf.uint8, (policy, index)
    out = autoaugment.auto_augment(image, policy, tf.constant([1, 2]))
    assert out.shape == image.shape and out.dtype == tf.uint8


def test_autoaugment_ops_match_pil():
    array = np.asarray(_image(20, 24)).astype(np.uint8)
    image, pil = tf.constant(array), Image.fromarray(array)
    assert np.array_equal(autoaugment.equalize(image), np.asarray(ImageOps.equalize(pil)))
    assert np.array_equal(autoaugment.invert(image), np.asarray(ImageOps.invert(pil)))
    assert np.array_equal(autoaugment.posterize(image, 5.0), np.asarray(ImageOps.posterize(pil, 5)))
    assert np.array_equal(autoaugment.solarize(image, 100.0), np.asarray(ImageOps.solarize(pil, 100)))
    contrast = np.asarray(autoaugment.auto_contrast(image)).astype(int)
    assert np.abs(contrast - np.asarray(ImageOps.autocontrast(pil)).astype(int)).max() <= 1
    assert np.array_equal(autoaugment.rotate(image, 0.0), array)
    assert np.array_equal(autoaugment.translate_x(image, 3.0)[:, 3:], array[:, :-3])
    assert (np.asarray(autoaugment.translate_x(image, 3.0))[:, :3] == 128).all()
