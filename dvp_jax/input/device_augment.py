"""Training augmentations on the accelerator (``input.augment_on='device'``), in jax.numpy.

With ``input.augment_on='device'`` the host only decodes each image and resizes it once to a
fixed ``R x R`` uint8 image (its centre square, resized to ``R = round(image_size /
input.crop_ratio)``, e.g. 224 -> 256: augment.py's 'stored_uint8'); the train batches carry that image plus the example's
'epoch' and 'index'. ``wrap_step`` puts ``augment_batch`` in front of the train step, inside its
jit: every device turns its own shard of uint8 images into float32 views (``shard_map`` over the
mesh's 'data' axis: nothing is gathered), with the same distributions as ``augment.py`` (the
host path):

  'moco_v2'         -> 'view1', 'view2' float32 [B, S, S, 3]: RandomResizedCrop(input.moco_crop_scale,
                       default 0.2..1) -> colour jitter (p 0.8; brightness, contrast, saturation
                       0.4, hue 0.1, in a random order) -> grayscale (p 0.2) -> Gaussian blur
                       (p 0.5, sigma ~ U[0.1, 2] pixels) -> flip (p 0.5) -> normalise.
  'train_crop_flip' -> 'image' float32 [B, S, S, 3]: RandomResizedCrop(0.08..1) -> flip ->
                       normalise (-> input.cutout). input.auto_augment needs the host path.

Randomness: example ``index`` of epoch ``epoch`` gets the key
fold_in(fold_in(fold_in(PRNGKey(seed), stream), epoch), index) (``example_keys``). The pipeline
puts the same examples at the same step for any number of processes (see pipeline.py), so the
views of step s are a pure function of (seed, s, example) on any number of devices and
processes, and a resumed run sees exactly the views of an uninterrupted one.

This module imports no TensorFlow: an accelerator host without it can run these functions.
The crop is the stored image's RandomResizedCrop (the host path crops the full decoded
image, whose borders the stored centre square drops), resized with the same antialiased
bilinear (triangle) filter as ``tf.image.resize(antialias=True)``.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dvp_jax import choices, config_checks

DEVICE_TRANSFORMS = ("moco_v2", "train_crop_flip")
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as augment.py, PIL and torchvision.
JITTER_STRENGTH = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue (as augment.py).
P_JITTER, P_GRAY, P_BLUR, BLUR_SIGMA = 0.8, 0.2, 0.5, (0.1, 2.0)
_AUGMENT_STREAM = 2  # The same stream number as pipeline.py's host augmentation seeds.
DEVICE_INPUT_KEYS = ("image", "epoch", "index")  # What augment_batch reads from a host batch.


# ----------------------------------------------------------------------------------------------
# Configuration.

def augment_on(input_config) -> str:
    """input.augment_on: 'host' (tf.data makes the views) or 'device'. Raises ConfigError."""
    mode = str(input_config.get("augment_on", "host"))
    if mode not in choices.AUGMENT_ON:
        raise config_checks.ConfigError(
            f"config.input.augment_on={mode!r}; use 'host' (tf.data) or 'device' (jax).")
    if mode == "device" and input_config.get("auto_augment", ""):
        raise config_checks.ConfigError(
            f"config.input.auto_augment={input_config.auto_augment!r} runs only on the host; "
            "set config.input.augment_on='host' or config.input.auto_augment=''.")
    return mode


def on_device(input_config, transform: str) -> bool:
    """True when ``transform`` of the train batches is made on the device."""
    return augment_on(input_config) == "device" and transform in DEVICE_TRANSFORMS


def moco_settings(input_config) -> dict:
    """The MoCo view's crop scale and probabilities from input.moco_* (MoCo v2's defaults)."""
    return {"scale": tuple(float(v) for v in input_config.get("moco_crop_scale", (0.2, 1.0))),
            "p_flip": float(input_config.get("moco_flip_prob", 0.5)),
            "p_blur": float(input_config.get("moco_blur_prob", P_BLUR)),
            "p_jitter": float(input_config.get("moco_jitter_prob", P_JITTER))}


# ----------------------------------------------------------------------------------------------
# Per-example pieces (no batch axis; ``augment_batch`` vmaps them).

def _uniform(key, shape=(), lo=0.0, hi=1.0):
    return jax.random.uniform(key, shape, jnp.float32, lo, hi)


def random_resized_crop_box(key, height: int, width: int, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3), attempts: int = 10):
    """torchvision's RandomResizedCrop box (top, left, h, w) int32 scalars, as augment.py's:
    10 tries of area ~ U[scale] x H*W, log(w/h) ~ U[log ratio]; the first that fits is placed
    uniformly; none fits -> the centre crop with the aspect ratio clipped into ``ratio``."""
    k_area, k_ratio, k_pos = jax.random.split(key, 3)
    target = height * width * _uniform(k_area, (attempts,), scale[0], scale[1])
    aspect = jnp.exp(_uniform(k_ratio, (attempts,), math.log(ratio[0]), math.log(ratio[1])))
    cw = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
    ch = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    fits = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
    first = jnp.argmax(fits)
    h, w = ch[first], cw[first]
    pos = _uniform(k_pos, (2,))
    top = jnp.minimum((pos[0] * (height - h + 1)).astype(jnp.int32), height - h)
    left = jnp.minimum((pos[1] * (width - w + 1)).astype(jnp.int32), width - w)
    in_ratio = width / height  # Static fallback (the whole image when square).
    fw = round(height * ratio[1]) if in_ratio > ratio[1] else width
    fh = round(width / ratio[0]) if in_ratio < ratio[0] else height
    ok = jnp.any(fits)
    return tuple(jnp.where(ok, a, b).astype(jnp.int32) for a, b in
                 ((top, (height - fh) // 2), (left, (width - fw) // 2), (h, fh), (w, fw)))


def resize_weights(start, length, in_size: int, out_size: int) -> jax.Array:
    """float32 [out_size, in_size]: row i = the normalised triangle-filter weights with which
    output pixel i of a resize of source pixels [start, start + length) to out_size pixels
    reads the source (half-pixel centres; the filter widens by length / out_size when
    shrinking: tf.image.resize(method='bilinear', antialias=True))."""
    length_f = length.astype(jnp.float32) if hasattr(length, "astype") else float(length)
    step = length_f / out_size
    centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * step
    support = jnp.maximum(step, 1.0)
    source = jnp.arange(in_size, dtype=jnp.float32) + 0.5
    w = jnp.maximum(0.0, 1.0 - jnp.abs(centres[:, None] - source[None, :]) / support)
    inside = (source >= start) & (source < start + length_f)
    w = jnp.where(inside[None, :], w, 0.0)
    return w / jnp.maximum(w.sum(axis=1, keepdims=True), 1e-12)


def crop_and_resize(image: jax.Array, box, size: int) -> jax.Array:
    """uint8/float [H, W, 3], box (top, left, h, w) -> float32 0..255 [size, size, 3]:
    two matmuls (rows, then columns) with ``resize_weights``."""
    height, width, channels = image.shape
    top, left, h, w = box
    wy = resize_weights(top, h, height, size)
    wx = resize_weights(left, w, width, size)
    x = image.astype(jnp.float32)
    rows = (wy @ x.reshape(height, width * channels)).reshape(size, width, channels)
    return jnp.einsum("ywc,xw->yxc", rows, wx)


def gray(x: jax.Array) -> jax.Array:
    """float [..., 3] -> luma [...]."""
    return x @ jnp.asarray(GRAY_WEIGHTS, jnp.float32)


def adjust_hue(x: jax.Array, delta) -> jax.Array:
    """Rotates the HSV hue of float 0..1 [..., 3] by ``delta`` turns (tf.image.adjust_hue)."""
    v = x.max(axis=-1)
    c = v - x.min(axis=-1)
    safe = jnp.where(c > 0, c, 1.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    h6 = jnp.where(v == r, jnp.mod((g - b) / safe, 6.0),
                   jnp.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h6 = jnp.where(c > 0, h6, 0.0)
    h6 = jnp.mod(h6 + 6.0 * delta, 6.0)
    k = jnp.mod(jnp.asarray([5.0, 3.0, 1.0]) + h6[..., None], 6.0)
    return v[..., None] - c[..., None] * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def color_jitter(x: jax.Array, p: dict) -> jax.Array:
    """torchvision ColorJitter of float 0..1 [H, W, 3] in the order p['jitter_order'] (as
    augment.color_jitter): brightness x*f; contrast: blend with the mean luma; saturation:
    blend with the luma image (each clipped to 0..1); hue: augment.py's HSV rotation."""
    ops = [
        lambda y: jnp.clip(y * p["brightness"], 0.0, 1.0),
        lambda y: jnp.clip(p["contrast"] * y + (1 - p["contrast"]) * gray(y).mean(), 0.0, 1.0),
        lambda y: jnp.clip(p["saturation"] * y + (1 - p["saturation"]) * gray(y)[..., None],
                           0.0, 1.0),
        lambda y: adjust_hue(y, p["hue"]),
    ]
    # One loop body holding the 4 ops (not 4 unrolled copies): a quarter of the compile time.
    order = jnp.asarray(p["jitter_order"])
    return jax.lax.fori_loop(0, 4, lambda k, y: jax.lax.switch(order[k], ops, y), x)


def blur_half_width(image_size: int, sigma_max: float = BLUR_SIGMA[1]) -> int:
    """Static kernel half-width: ceil(3 * sigma_max), capped so the kernel fits the image."""
    cap = image_size if image_size % 2 else image_size - 1
    return max(0, min(2 * math.ceil(3.0 * sigma_max) + 1, cap) // 2)


def gaussian_blur(x: jax.Array, sigma) -> jax.Array:
    """Separable Gaussian blur of float [H, W, C], ``sigma`` in pixels (<= 2), reflect padding.

    Taps |t| <= min(ceil(3 sigma), blur_half_width(H)), normalised to sum 1: sigma means the
    same at every image size (PIL's GaussianBlur radius, as MoCo v2; augment.gaussian_blur).
    """
    half = blur_half_width(x.shape[0])
    if half == 0:
        return x
    taps = jnp.arange(-half, half + 1, dtype=jnp.float32)
    reach = jnp.minimum(jnp.ceil(3.0 * sigma), float(half))
    k = jnp.where(jnp.abs(taps) <= reach, jnp.exp(-taps ** 2 / (2.0 * sigma ** 2)), 0.0)
    k = k / k.sum()
    n_rows, n_cols = x.shape[0], x.shape[1]
    y = jnp.pad(x, ((half, half), (0, 0), (0, 0)), mode="reflect")
    y = sum(k[t] * y[t:t + n_rows] for t in range(2 * half + 1))
    y = jnp.pad(y, ((0, 0), (half, half), (0, 0)), mode="reflect")
    return sum(k[t] * y[:, t:t + n_cols] for t in range(2 * half + 1))


def sample_moco_view_params(key, *, p_jitter=P_JITTER, p_blur=P_BLUR, p_flip=0.5) -> dict:
    """The random decisions of one MoCo view except its crop box (as augment.py's): bools
    'jitter', 'grayscale', 'blur', 'flip'; factors 'brightness', 'contrast', 'saturation'
    ~ U[0.6, 1.4]; 'hue' ~ U[-0.1, 0.1] turns; 'sigma' ~ U[0.1, 2] pixels; 'jitter_order'
    int32 [4], a uniform permutation of brightness(0), contrast(1), saturation(2), hue(3)."""
    k = jax.random.split(key, 10)
    b, c, s, h = JITTER_STRENGTH
    return {
        "jitter": _uniform(k[0]) < p_jitter,
        "jitter_order": jnp.argsort(_uniform(k[1], (4,)), stable=True).astype(jnp.int32),
        "brightness": _uniform(k[2], (), 1 - b, 1 + b),
        "contrast": _uniform(k[3], (), 1 - c, 1 + c),
        "saturation": _uniform(k[4], (), 1 - s, 1 + s),
        "hue": _uniform(k[5], (), -h, h),
        "grayscale": _uniform(k[6]) < P_GRAY,
        "blur": _uniform(k[7]) < p_blur,
        "sigma": _uniform(k[8], (), BLUR_SIGMA[0], BLUR_SIGMA[1]),
        "flip": _uniform(k[9]) < p_flip,
    }


def normalize(x: jax.Array, input_config, max_value: float = 1.0) -> jax.Array:
    """float 0..max_value [..., 3] -> (x / max_value - input.mean) / input.std."""
    mean = jnp.asarray(tuple(input_config.mean), jnp.float32)
    std = jnp.asarray(tuple(input_config.std), jnp.float32)
    return x * (1.0 / (max_value * std)) - mean / std


def moco_view(image: jax.Array, key, *, image_size: int, input_config) -> jax.Array:
    """One MoCo v2 view of uint8 [R, R, 3] -> float32 [S, S, 3] (module docstring)."""
    settings = moco_settings(input_config)
    k_crop, k_params = jax.random.split(key)
    p = sample_moco_view_params(k_params, p_jitter=settings["p_jitter"],
                                p_blur=settings["p_blur"], p_flip=settings["p_flip"])
    box = random_resized_crop_box(k_crop, image.shape[0], image.shape[1], scale=settings["scale"])
    x = jnp.clip(crop_and_resize(image, box, image_size) * (1.0 / 255.0), 0.0, 1.0)
    x = jnp.where(p["jitter"], color_jitter(x, p), x)
    x = jnp.where(p["grayscale"], jnp.repeat(gray(x)[..., None], 3, axis=-1), x)
    x = jnp.where(p["blur"], gaussian_blur(x, p["sigma"]), x)
    x = jnp.where(p["flip"], x[:, ::-1], x)
    return normalize(x, input_config)


def cutout(x: jax.Array, key, size: int) -> jax.Array:
    """augment.cutout: zero a size x size square (clipped) centred at a uniform random pixel."""
    h, w = x.shape[0], x.shape[1]
    centre = _uniform(key, (2,))
    cy, cx = (centre[0] * h).astype(jnp.int32), (centre[1] * w).astype(jnp.int32)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    inside = ((rows >= cy - size // 2) & (rows < cy - size // 2 + size)
              & (cols >= cx - size // 2) & (cols < cx - size // 2 + size))
    return x * (~inside)[..., None].astype(x.dtype)


def example_fn(transform: str, input_config, image_size: int) -> Callable[[jax.Array, jax.Array], dict]:
    """(uint8 [R, R, 3], key) -> dict of float32 outputs of ``transform`` (module docstring)."""
    if transform == "moco_v2":
        def moco(image, key):  # Both views from one traced view function (half the compile).
            views = jax.vmap(lambda k: moco_view(image, k, image_size=image_size,
                                                 input_config=input_config))(jax.random.split(key))
            return {"view1": views[0], "view2": views[1]}
        return moco
    if transform == "train_crop_flip":
        cutout_size = int(input_config.get("cutout", 0) or 0)

        def crop_flip(image, key):
            k_crop, k_flip, _, k_cut = jax.random.split(key, 4)  # Slot 2: AutoAugment's (host).
            box = random_resized_crop_box(k_crop, image.shape[0], image.shape[1], (0.08, 1.0))
            x = crop_and_resize(image, box, image_size)
            x = normalize(jnp.where(_uniform(k_flip) < 0.5, x[:, ::-1], x), input_config, 255.0)
            return {"image": cutout(x, k_cut, cutout_size) if cutout_size > 0 else x}
        return crop_flip
    raise ValueError(f"Transform {transform!r} has no device version; "
                     f"device transforms: {', '.join(DEVICE_TRANSFORMS)}.")


# ----------------------------------------------------------------------------------------------
# Batches.

def example_keys(seed: int, epoch: jax.Array, index: jax.Array) -> jax.Array:
    """Keys [B] of examples ``index`` int32 [B] in epochs ``epoch`` int32 [B]."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed % 2 ** 32), seed // 2 ** 32)
    base = jax.random.fold_in(base, _AUGMENT_STREAM)
    return jax.vmap(lambda e, i: jax.random.fold_in(jax.random.fold_in(base, e), i))(epoch, index)


def augment_batch(batch: dict, *, transform: str, input_config, image_size: int,
                  seed: int) -> dict:
    """Device-mode host batch ('image' uint8 [B, R, R, 3], 'epoch', 'index' int32 [B], ...) ->
    the transform's float32 outputs plus every other key except 'epoch' (per example, vmapped)."""
    fn = example_fn(transform, input_config, image_size)
    keys = example_keys(seed, batch["epoch"], batch["index"])
    out = {k: v for k, v in batch.items() if k not in ("image", "epoch")}
    out.update(jax.vmap(fn)(batch["image"], keys))
    return out


def sharded_augment(mesh, **kwargs) -> Callable[[dict], dict]:
    """``augment_batch`` run by every device of ``mesh`` on its own shard of the batch."""
    from dvp_jax import sharding
    spec = P(sharding.DATA_AXIS)
    return jax.shard_map(lambda b: augment_batch(b, **kwargs), mesh=mesh, in_specs=spec,
                         out_specs=spec)


def wrap_step(train_step: Callable, config, mesh, transform: str) -> Callable:
    """``train_step`` itself in host mode; in device mode (state, host batch) ->
    train_step(state, the batch augmented on the devices), one jitted program."""
    if not on_device(config.input, transform):
        return train_step
    augment = sharded_augment(mesh, transform=transform, input_config=config.input,
                              image_size=int(config.input.image_size), seed=int(config.seed))

    def step(state, batch):
        return train_step(state, augment(batch))
    return step
