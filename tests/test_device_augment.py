"""input.augment_on='device': the jax views have the host path's distributions and pieces,
are the same on 1 and 4 devices, and resume exactly."""
import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from dvp_jax import config_base, config_checks, sharding
from dvp_jax.input import augment, device_augment, pipeline
from helpers import assert_moco_decision_rates

N_DRAWS = 2000


def _config(**overrides):
    c = config_base.input_config("synthetic", image_size=8)
    c.synthetic_num_examples = 32
    c.synthetic_image_size = 12
    c.crop_ratio = 0.8  # Stored squares of round(8 / 0.8) = 10 px.
    c.augment_on = "device"
    for key, value in overrides.items():
        setattr(c, key, value)
    return c


def _keys(n=N_DRAWS):
    return jax.random.split(jax.random.PRNGKey(17), n)


def _image(h=10, w=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_moco_decision_rates_match_the_host_path():
    # Same draws and tolerances as tests/test_input_augment.py::test_moco_decision_rates.
    p = jax.device_get(jax.jit(jax.vmap(device_augment.sample_moco_view_params))(_keys()))
    assert_moco_decision_rates(p)


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.08, 1.0)])
def test_random_resized_crop_box_ranges(scale):
    h = w = 240
    box = jax.jit(jax.vmap(lambda k: device_augment.random_resized_crop_box(k, h, w, scale)))
    top, left, ch, cw = (np.asarray(v) for v in box(_keys()))
    area = ch * cw / (h * w)
    assert area.min() >= scale[0] - 0.005 and area.max() <= 1.0
    assert area.min() < scale[0] + 0.02 and area.max() > 0.9
    aspect = cw / ch
    assert aspect.min() >= 3 / 4 - 0.03 and aspect.max() <= 4 / 3 + 0.03
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + ch <= h).all() and (left + cw <= w).all()
    # Placement is uniform: the mean free space above the crop is split about evenly.
    assert 0.4 < (top / np.maximum(h - ch, 1)).mean() < 0.6


def test_random_resized_crop_fallback_is_the_centre_crop():
    box = device_augment.random_resized_crop_box(jax.random.PRNGKey(3), 10, 1000, (0.9, 1.0))
    assert [int(v) for v in box] == [0, (1000 - 13) // 2, 10, 13]


@pytest.mark.parametrize("box", [(0, 0, 40, 56), (3, 5, 20, 17), (10, 2, 6, 9), (0, 30, 40, 26)])
def test_crop_and_resize_matches_tensorflow_antialiased_bilinear(box):
    image = _image(40, 56)
    expected = augment.crop_and_resize(tf.constant(image), [tf.constant(v) for v in box], 12,
                                       antialias=True).numpy()
    got = np.asarray(device_augment.crop_and_resize(image, jnp.asarray(box), 12))
    assert np.abs(got - expected).max() < 0.05  # Of 0..255: float32 rounding only.


@pytest.mark.parametrize("delta", [-0.1, 0.03, 0.25])
def test_adjust_hue_matches_tensorflow(delta):
    x = _image(9, 11).astype(np.float32) / 255.0
    x[0, 0] = 0.5  # A gray pixel (no hue) and a black one.
    x[0, 1] = 0.0
    expected = tf.image.adjust_hue(x, delta).numpy()
    assert np.abs(np.asarray(device_augment.adjust_hue(x, delta)) - expected).max() < 1e-5


def test_color_jitter_matches_the_host_path():
    x = _image(9, 11).astype(np.float32) / 255.0
    params = {"brightness": 1.3, "contrast": 0.7, "saturation": 1.2, "hue": -0.05}
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]):
        p = dict(params, jitter_order=np.asarray(order, np.int32))
        expected = augment.color_jitter(tf.constant(x), dict(p, jitter_order=tf.constant(order)))
        got = device_augment.color_jitter(jnp.asarray(x), p)
        assert np.abs(np.asarray(got) - expected.numpy()).max() < 1e-5, order


def _numpy_blur(x, sigma, half):
    taps = np.arange(-half, half + 1)
    k = np.where(np.abs(taps) <= min(np.ceil(3 * sigma), half), np.exp(-taps ** 2 / (2 * sigma ** 2)), 0)
    k = k / k.sum()
    y = np.pad(x, ((half, half), (0, 0), (0, 0)), mode="reflect")
    y = sum(k[t] * y[t:t + x.shape[0]] for t in range(2 * half + 1))
    y = np.pad(y, ((0, 0), (half, half), (0, 0)), mode="reflect")
    return sum(k[t] * y[:, t:t + x.shape[1]] for t in range(2 * half + 1))


def test_gaussian_blur_sigma_in_pixels_capped_by_the_image():
    assert device_augment.blur_half_width(224) == 6  # ceil(3 * 2) taps each side.
    assert device_augment.blur_half_width(8) == 3 and device_augment.blur_half_width(2) == 0
    x = np.random.default_rng(1).random((16, 16, 3)).astype(np.float32)
    for sigma in (0.1, 0.7, 2.0):
        got = np.asarray(device_augment.gaussian_blur(jnp.asarray(x), sigma))
        assert np.allclose(got, _numpy_blur(x, sigma, 6), atol=1e-5), sigma
    assert np.allclose(device_augment.gaussian_blur(jnp.asarray(x), 0.1), x, atol=1e-4)
    assert np.allclose(device_augment.gaussian_blur(jnp.full((9, 9, 3), 0.25), 1.5), 0.25)


@pytest.fixture(scope="module")
def moco_outputs():
    """400 examples of one 10 x 10 image through the device 'moco_v2' (one compile)."""
    c = _config()
    n = 400
    batch = {"image": np.broadcast_to(_image(), (n, 10, 10, 3)),
             "epoch": np.zeros(n, np.int32), "index": np.arange(n, dtype=np.int32)}
    fn = jax.jit(lambda b: device_augment.augment_batch(b, transform="moco_v2", input_config=c,
                                                        image_size=8, seed=0))
    return c, jax.device_get(fn(batch)), jax.device_get(fn(dict(batch, epoch=batch["epoch"] + 1)))


def test_moco_views_grayscale_rate_and_views_differ(moco_outputs):
    c, out, next_epoch = moco_outputs
    for name in ("view1", "view2"):
        v = out[name]
        assert v.shape == (400, 8, 8, 3) and v.dtype == np.float32
        pixels = v * np.asarray(c.std) + np.asarray(c.mean)  # Back to 0..1.
        assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5
        is_gray = np.abs(pixels - pixels[..., :1]).max(axis=(1, 2, 3)) < 1e-5
        # p = 0.2 over 400 views: sigma 0.02; 0.07 is 3.5 sigma.
        assert abs(is_gray.mean() - 0.2) < 0.07, name
    differ = np.abs(out["view1"] - out["view2"]).max(axis=(1, 2, 3)) > 1e-3
    assert differ.all()
    assert (np.abs(out["view1"] - next_epoch["view1"]).max(axis=(1, 2, 3)) > 1e-3).all()
    assert np.array_equal(out["index"], np.arange(400)) and "epoch" not in out


@functools.lru_cache(maxsize=None)
def _sharded(num_devices: int, transform: str, cutout: int = 0):
    """(jitted augmentation on the first num_devices devices, mesh): seed 3, 8 px views."""
    mesh = sharding.make_mesh(jax.devices()[:num_devices])
    fn = jax.jit(device_augment.sharded_augment(mesh, transform=transform, image_size=8, seed=3,
                                                input_config=_config(cutout=cutout)))
    return lambda batch: jax.device_get(fn(sharding.to_global(batch, mesh)))


def test_one_and_four_devices_give_the_same_views():
    assert jax.device_count() == 4
    rng = np.random.default_rng(2)
    batch = {"image": rng.integers(0, 256, (8, 10, 10, 3), dtype=np.uint8),
             "epoch": np.full(8, 3, np.int32), "index": rng.permutation(8).astype(np.int32),
             "label": np.arange(8, dtype=np.int32)}
    one, four = _sharded(1, "moco_v2")(batch), _sharded(4, "moco_v2")(batch)
    assert sorted(one) == sorted(four) == ["index", "label", "view1", "view2"]
    for key in one:
        np.testing.assert_allclose(one[key], four[key], atol=1e-6, err_msg=key)
    crop = _sharded(4, "train_crop_flip", cutout=3)(batch)["image"]
    assert crop.shape == (8, 8, 8, 3)
    assert ((crop == 0).all(axis=-1).sum(axis=(1, 2)) >= 4).all()  # Cutout squares (clipped).


def test_device_mode_batches_resume_exactly_and_split_over_processes():
    c = _config()
    kw = dict(global_batch=8, seed=3, image_size=8)  # As _sharded's.
    full = pipeline.make_train_iterator(c, "train", "moco_v2", process_index=0, process_count=1,
                                        **kw)
    steps = [next(full) for _ in range(6)]  # 4 steps per epoch: crosses an epoch.
    assert steps[0]["image"].shape == (8, 10, 10, 3) and steps[0]["image"].dtype == np.uint8
    assert sorted(steps[0]) == ["epoch", "image", "index", "label"]
    assert steps[3]["epoch"].max() == 0 and (steps[4]["epoch"] == 1).all()
    resumed = pipeline.make_train_iterator(c, "train", "moco_v2", start_step=3, process_index=0,
                                           process_count=1, **kw)
    halves = [pipeline.make_train_iterator(c, "train", "moco_v2", start_step=3, process_index=p,
                                           process_count=2, **kw) for p in range(2)]
    augment_fn = _sharded(4, "moco_v2")
    for step in range(3, 6):
        again = next(resumed)
        split = [next(h) for h in halves]
        for key in steps[step]:
            assert np.array_equal(again[key], steps[step][key]), (step, key)
            assert np.array_equal(np.concatenate([s[key] for s in split]), steps[step][key])
        views, expected = augment_fn(again), augment_fn(steps[step])
        assert np.array_equal(views["view1"], expected["view1"])


def test_stored_uint8_keeps_the_centre_square():
    c = _config()  # Stored side round(8 / 0.8) = 10.
    stored = augment.get_transform("stored_uint8", c, image_size=8)
    wide = np.zeros((30, 50, 3), np.uint8)
    wide[:, :10] = wide[:, 40:] = 255  # Outside the centre 30 x 30 square.
    wide[:, 10:40, 1] = 90
    out = stored(tf.constant(wide), tf.constant([0, 0]))["image"].numpy()
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert (out[..., 0] == 0).all() and (out[..., 1] == 90).all()
    small = stored(tf.constant(_image(6, 7)), tf.constant([0, 0]))["image"].numpy()
    assert small.shape == (10, 10, 3) and small.std() > 10  # Enlarged (bilinear), not flat.


def test_host_mode_and_eval_are_unchanged():
    c = _config(augment_on="host")
    batch = next(pipeline.make_train_iterator(c, "train", "moco_v2", global_batch=8, seed=0,
                                              image_size=8, process_index=0, process_count=1))
    assert batch["view1"].shape == (8, 8, 8, 3) and "epoch" not in batch
    assert not device_augment.on_device(_config(), "eval_center")


def test_bad_modes_are_config_errors():
    with pytest.raises(config_checks.ConfigError, match="augment_on"):
        device_augment.augment_on(_config(augment_on="gpu"))
    with pytest.raises(config_checks.ConfigError, match="auto_augment"):
        device_augment.augment_on(_config(auto_augment="imagenet"))


def test_imports_without_tensorflow():
    code = ("import sys; sys.modules['tensorflow'] = None\n"
            "from dvp_jax.input import device_augment\n"
            "assert 'tensorflow' not in {m.split('.')[0] for m in sys.modules if sys.modules[m]}")
    subprocess.run([sys.executable, "-c", code], check=True)
