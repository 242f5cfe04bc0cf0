"""Per-example transforms: a registry ``TRANSFORMS`` of name -> factory.

``get_transform(name, input_config, image_size=S)`` returns ``f(image, seed) -> dict`` where
``image`` is uint8 [H, W, 3] and ``seed`` int32/int64 [2]. All randomness is stateless
(tf.random.stateless_*), so each output is a pure function of (image, seed): runs reproduce and
resume exactly. Outputs are float32, NHWC, values ``(x / 255 - input.mean) / input.std``.

  'moco_v2'         -> {'view1': [S, S, 3], 'view2': [S, S, 3]}  MoCo v2 "aug-plus", two draws.
  'train_crop_flip' -> {'image': [S, S, 3]}  RandomResizedCrop(0.08..1) + flip
                       (+ input.auto_augment, + input.cutout: a mean-grey square).
  'eval_center'     -> {'image': [S, S, 3]}  resize shorter side to round(S / crop_ratio),
                       centre crop S.
  'ten_crop'        -> {'image': [10, S, S, 3]}  same resize, torchvision TenCrop.
  'stored_uint8'    -> {'image': uint8 [R, R, 3]}  the host half of input.augment_on='device':
                       the centre square resized to R = round(S / crop_ratio) (area averaging).

To add a transform: write ``def my_transform(input_config, image_size) -> f(image, seed)`` and
register it in TRANSFORMS.
"""
from __future__ import annotations

import math
from typing import Callable

import tensorflow as tf

from dvp_jax.input import autoaugment, eval_crops

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL / torchvision.
Transform = Callable[[tf.Tensor, tf.Tensor], dict]


# ----------------------------------------------------------------------------------------------
# Shared pieces.

def _split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
    seeds = tf.random.experimental.stateless_split(seed, num=num)
    return [seeds[i] for i in range(num)]


def _uniform(seed, shape=(), minval=0.0, maxval=1.0):
    return tf.random.stateless_uniform(list(shape), seed=seed, minval=minval, maxval=maxval)


def normalize(x: tf.Tensor, input_config, max_value: float = 1.0) -> tf.Tensor:
    """float32 0..max_value [..., 3] -> (x / max_value - mean) / std with input.mean / input.std.

    Computed as x * a + b: one multiply-add (TF's per-channel (x - m) / s is several times slower).
    """
    mean = tf.constant(tuple(input_config.mean), tf.float32)
    std = tf.constant(tuple(input_config.std), tf.float32)
    return x * (1.0 / (max_value * std)) + (-mean / std)


def color_matrix(x: tf.Tensor, matrix) -> tf.Tensor:
    """Per-pixel colour transform: [..., 3] @ matrix [3, k] -> [..., k], as one matmul."""
    matrix = tf.convert_to_tensor(matrix, tf.float32)
    flat = tf.reshape(x, [-1, 3]) @ matrix
    return tf.reshape(flat, tf.concat([tf.shape(x)[:-1], tf.shape(matrix)[1:]], 0))


def gray_rgb(x: tf.Tensor) -> tf.Tensor:
    """float [..., 3] -> its luma repeated over 3 channels (torchvision Grayscale(3))."""
    return color_matrix(x, tf.tile(tf.constant(GRAY_WEIGHTS, tf.float32)[:, None], [1, 3]))


def random_resized_crop_box(height, width, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                            attempts: int = 10):
    """torchvision's RandomResizedCrop box: (top, left, crop_height, crop_width), int32 scalars.

    Up to ``attempts`` tries: area fraction ~ U[scale], log aspect ratio (w/h) ~ U[log ratio],
    w = round(sqrt(area * ratio)), h = round(sqrt(area / ratio)); the first that fits is placed
    uniformly at random. If none fits: the centre crop with the aspect ratio clipped into
    ``ratio`` (the whole image when its ratio is inside). The area fraction h*w/(H*W) is in
    ``scale`` up to rounding of h and w (about 1/sqrt(area) relative).
    """
    height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    s_area, s_ratio, s_pos = _split_seed(seed, 3)
    target = h_f * w_f * _uniform(s_area, [attempts], scale[0], scale[1])
    aspect = tf.exp(_uniform(s_ratio, [attempts], math.log(ratio[0]), math.log(ratio[1])))
    cw = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
    ch = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
    fits = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    pos = _uniform(s_pos, [2])

    def sampled():
        h, w = ch[first], cw[first]
        top = tf.minimum(tf.cast(pos[0] * tf.cast(height - h + 1, tf.float32), tf.int32), height - h)
        left = tf.minimum(tf.cast(pos[1] * tf.cast(width - w + 1, tf.float32), tf.int32), width - w)
        return top, left, h, w

    def fallback():
        in_ratio = w_f / h_f
        w = tf.where(in_ratio < ratio[0], width,
                     tf.where(in_ratio > ratio[1], tf.cast(tf.round(h_f * ratio[1]), tf.int32), width))
        h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w_f / ratio[0]), tf.int32), height)
        return (height - h) // 2, (width - w) // 2, h, w

    return tf.cond(tf.reduce_any(fits), sampled, fallback)


def crop_and_resize(image: tf.Tensor, box, size: int, antialias: bool) -> tf.Tensor:
    """Crops ``box`` = (top, left, h, w) of uint8 [H, W, 3]; bilinear resize -> float32 0..255 [S, S, 3]."""
    top, left, h, w = box
    crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([h, w, 3]))

    def resize(with_antialias):
        return lambda: tf.image.resize(crop, [size, size], method="bilinear",
                                       antialias=with_antialias)

    if not antialias:
        out = resize(False)()
    else:  # Antialiasing only changes downscaling, and costs about 3x: skip it when upscaling.
        out = tf.cond((h > size) | (w > size), resize(True), resize(False))
    return tf.reshape(out, [size, size, 3])


def random_flip(x: tf.Tensor, seed) -> tf.Tensor:
    """Horizontal flip of [H, W, C] with probability 1/2."""
    return tf.cond(_uniform(seed) < 0.5, lambda: tf.reverse(x, axis=[1]), lambda: x)


def _antialias(input_config) -> bool:
    return bool(input_config.get("resize_antialias", True))


# ----------------------------------------------------------------------------------------------
# MoCo v2 "aug-plus".

JITTER_STRENGTH = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}
P_JITTER, P_GRAY, P_BLUR, BLUR_SIGMA = 0.8, 0.2, 0.5, (0.1, 2.0)


def sample_moco_view_params(seed, *, p_jitter: float = P_JITTER, p_blur: float = P_BLUR,
                            p_flip: float = 0.5) -> dict:
    """Every random decision of one MoCo v2 view except its crop box (which needs the image size).

    Returns scalars: 'jitter', 'grayscale', 'blur', 'flip' (bool; probabilities p_jitter (0.8),
    0.2, p_blur (0.5), p_flip (0.5)), 'brightness', 'contrast', 'saturation' (factors ~ U[0.6, 1.4]), 'hue' (shift in
    fractions of the colour circle ~ U[-0.1, 0.1]), 'sigma' (blur sigma in pixels ~ U[0.1, 2]);
    and 'jitter_order' int32 [4]: the order of brightness(0), contrast(1), saturation(2), hue(3),
    a uniform random permutation as in torchvision's ColorJitter.
    """
    s = _split_seed(seed, 10)
    b, c, sat, hue = (JITTER_STRENGTH[k] for k in ("brightness", "contrast", "saturation", "hue"))
    return {
        "jitter": _uniform(s[0]) < p_jitter,
        "jitter_order": tf.cast(tf.argsort(_uniform(s[1], [4]), stable=True), tf.int32),
        "brightness": _uniform(s[2], (), 1 - b, 1 + b),
        "contrast": _uniform(s[3], (), 1 - c, 1 + c),
        "saturation": _uniform(s[4], (), 1 - sat, 1 + sat),
        "hue": _uniform(s[5], (), -hue, hue),
        "grayscale": _uniform(s[6]) < P_GRAY,
        "blur": _uniform(s[7]) < p_blur,
        "sigma": _uniform(s[8], (), BLUR_SIGMA[0], BLUR_SIGMA[1]),
        "flip": _uniform(s[9]) < p_flip,
    }


def color_jitter(x: tf.Tensor, params: dict) -> tf.Tensor:
    """torchvision ColorJitter on float 0..1 [H, W, 3], in the order ``params['jitter_order']``.

    brightness: x*f; contrast: blend with the mean luma; saturation: blend with the luma image
    (all clipped to 0..1); hue: rotate the HSV hue by params['hue'] of a turn.
    """
    gray = tf.constant(GRAY_WEIGHTS, tf.float32)

    def brightness(y):
        return tf.clip_by_value(y * params["brightness"], 0.0, 1.0)

    def contrast(y):
        c = params["contrast"]
        mean_luma = tf.tensordot(tf.reduce_mean(y, axis=[0, 1]), gray, 1)
        return tf.clip_by_value(c * y + (1 - c) * mean_luma, 0.0, 1.0)

    def saturation(y):  # s * y + (1 - s) * luma(y), as one colour matrix.
        s = params["saturation"]
        matrix = s * tf.eye(3) + (1 - s) * tf.tile(gray[:, None], [1, 3])
        return tf.clip_by_value(color_matrix(y, matrix), 0.0, 1.0)

    def hue(y):
        return tf.image.adjust_hue(y, params["hue"])

    ops = [brightness, contrast, saturation, hue]
    for k in range(4):
        x = tf.switch_case(params["jitter_order"][k], [lambda f=f: f(x) for f in ops])
    return x


def blur_kernel_size(sigma: float, image_size: int) -> int:
    """Odd Gaussian kernel side for ``sigma`` pixels: 2 * ceil(3 * sigma) + 1, capped by the image
    (the largest odd side <= image_size). sigma 2 -> 13, sigma 0.5 -> 5; at 8 px sigma 2 -> 7."""
    side = 2 * math.ceil(3.0 * sigma) + 1
    cap = image_size if image_size % 2 else image_size - 1
    return max(1, min(side, cap))


def gaussian_blur(x: tf.Tensor, sigma, image_size: int, sigma_max: float = BLUR_SIGMA[1]) -> tf.Tensor:
    """Separable Gaussian blur of float [H, W, C] (reflect padding), ``sigma`` in pixels.

    The kernel has side ``blur_kernel_size(sigma, image_size)`` (taps |t| <= ceil(3 sigma), at
    most the image's side), so sigma means the same at 16, 32 and 224 px (PIL's GaussianBlur
    radius, as MoCo v2). ``sigma`` may be a tensor <= sigma_max: one static kernel of the largest
    side is built and the taps outside the sigma's own side are zeroed.
    """
    half = blur_kernel_size(sigma_max, image_size) // 2
    if half == 0:
        return x
    sigma = tf.cast(sigma, tf.float32)
    taps = tf.range(-half, half + 1, dtype=tf.float32)
    reach = tf.minimum(tf.math.ceil(3.0 * sigma), float(half))
    k = tf.where(tf.abs(taps) <= reach, tf.exp(-(taps ** 2) / (2.0 * sigma ** 2)), 0.0)
    k = k / tf.reduce_sum(k)
    channels = x.shape[-1]
    side = 2 * half + 1
    y = tf.pad(x[None], [[0, 0], [half, half], [half, half], [0, 0]], mode="REFLECT")
    kv = tf.tile(tf.reshape(k, [side, 1, 1, 1]), [1, 1, channels, 1])
    kh = tf.tile(tf.reshape(k, [1, side, 1, 1]), [1, 1, channels, 1])
    y = tf.nn.depthwise_conv2d(y, kv, [1, 1, 1, 1], "VALID")
    y = tf.nn.depthwise_conv2d(y, kh, [1, 1, 1, 1], "VALID")
    return y[0]


def moco_view_settings(input_config) -> dict:
    """The view's strengths from ``input.moco_*`` (MoCo v2's ImageNet values when absent)."""
    return {"scale": tuple(float(v) for v in input_config.get("moco_crop_scale", (0.2, 1.0))),
            "p_flip": float(input_config.get("moco_flip_prob", 0.5)),
            "p_blur": float(input_config.get("moco_blur_prob", P_BLUR)),
            "p_jitter": float(input_config.get("moco_jitter_prob", P_JITTER))}


def moco_view(image: tf.Tensor, seed, *, image_size: int, input_config) -> tf.Tensor:
    """One MoCo v2 view: RRC(input.moco_crop_scale) -> jitter(p .8) -> gray(p .2) -> blur(p .5)
    -> flip(p .5) -> normalise (probabilities from input.moco_*_prob)."""
    settings = moco_view_settings(input_config)
    crop_seed, param_seed = _split_seed(seed, 2)
    p = sample_moco_view_params(param_seed, p_jitter=settings["p_jitter"],
                                p_blur=settings["p_blur"], p_flip=settings["p_flip"])
    shape = tf.shape(image)
    box = random_resized_crop_box(shape[0], shape[1], crop_seed, scale=settings["scale"])
    x = crop_and_resize(image, box, image_size, _antialias(input_config)) * (1.0 / 255.0)
    x = tf.clip_by_value(x, 0.0, 1.0)  # Guards against float rounding in the resize.
    x = tf.cond(p["jitter"], lambda: color_jitter(x, p), lambda: x)
    x = tf.cond(p["grayscale"], lambda: gray_rgb(x), lambda: x)
    x = tf.cond(p["blur"], lambda: gaussian_blur(x, p["sigma"], image_size), lambda: x)
    x = tf.cond(p["flip"], lambda: tf.reverse(x, axis=[1]), lambda: x)
    return tf.reshape(normalize(x, input_config), [image_size, image_size, 3])


def moco_v2(input_config, image_size: int) -> Transform:
    def transform(image, seed):
        s1, s2 = _split_seed(seed, 2)
        return {"view1": moco_view(image, s1, image_size=image_size, input_config=input_config),
                "view2": moco_view(image, s2, image_size=image_size, input_config=input_config)}
    return transform


# ----------------------------------------------------------------------------------------------
# Supervised training.

def cutout(x: tf.Tensor, seed, size: int) -> tf.Tensor:
    """Cutout on an UNnormalised float [H, W, C] (0..255): a size x size square (clipped at the
    border) centred at a uniform random pixel is set to the image's mean grey (one value, the
    mean over all pixels and channels), as the DVP release's Cutout fills it. Its presets use
    size = image_size // 4 (the release's ``Cutout(length=input_res // 4)``).

    The release places the square at top, left ~ U{-size//2, .., H - size - 1} (clipped at 0),
    and a typo there (``left = 0 if left < 0 else top``) puts every unclipped square on the
    diagonal; here the centre is uniform over the image (DeVries & Taylor), as intended.
    """
    shape = tf.shape(x)
    h, w = shape[0], shape[1]
    centre = _uniform(seed, [2])
    cy = tf.cast(centre[0] * tf.cast(h, tf.float32), tf.int32)
    cx = tf.cast(centre[1] * tf.cast(w, tf.float32), tf.int32)
    rows = tf.range(h)[:, None]
    cols = tf.range(w)[None, :]
    inside = ((rows >= cy - size // 2) & (rows < cy - size // 2 + size)
              & (cols >= cx - size // 2) & (cols < cx - size // 2 + size))
    return tf.where(inside[..., None], tf.reduce_mean(x), x)


def train_crop_flip(input_config, image_size: int) -> Transform:
    policy = str(input_config.get("auto_augment", "") or "")
    if policy and policy not in autoaugment.POLICIES:
        raise ValueError(f"input.auto_augment={policy!r}: use '' or one of "
                         f"{sorted(autoaugment.POLICIES)}.")
    cutout_size = int(input_config.get("cutout", 0) or 0)
    antialias = _antialias(input_config)

    def transform(image, seed):
        s_crop, s_flip, s_aa, s_cut = _split_seed(seed, 4)
        shape = tf.shape(image)
        box = random_resized_crop_box(shape[0], shape[1], s_crop, scale=(0.08, 1.0))
        x = random_flip(crop_and_resize(image, box, image_size, antialias), s_flip)
        if policy:
            u8 = tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)
            x = tf.cast(autoaugment.auto_augment(u8, policy, s_aa), tf.float32)
        if cutout_size > 0:
            x = cutout(x, s_cut, cutout_size)
        x = normalize(x, input_config, max_value=255.0)
        return {"image": tf.reshape(x, [image_size, image_size, 3])}

    return transform


# ----------------------------------------------------------------------------------------------
# Evaluation.

def eval_center(input_config, image_size: int) -> Transform:
    resize = eval_crops.resize_size(image_size, input_config)

    def transform(image, seed):
        del seed
        x = eval_crops.resize_shorter_side(image, resize)
        shape = tf.shape(x)
        top, left = eval_crops.center_crop_box(shape[0], shape[1], image_size)
        x = x[top:top + image_size, left:left + image_size]
        x = normalize(tf.clip_by_value(x, 0.0, 255.0), input_config, max_value=255.0)
        return {"image": tf.reshape(x, [image_size, image_size, 3])}

    return transform


def ten_crop(input_config, image_size: int) -> Transform:
    resize = eval_crops.resize_size(image_size, input_config)

    def transform(image, seed):
        del seed
        x = eval_crops.resize_shorter_side(image, resize)
        shape = tf.shape(x)
        crops = []
        for k, (top, left) in enumerate(eval_crops.ten_crop_boxes(shape[0], shape[1], image_size)):
            crop = x[top:top + image_size, left:left + image_size]
            crops.append(tf.reverse(crop, axis=[1]) if k >= 5 else crop)
        x = normalize(tf.clip_by_value(tf.stack(crops), 0.0, 255.0), input_config, max_value=255.0)
        return {"image": tf.reshape(x, [10, image_size, image_size, 3])}

    return transform


def stored_uint8(input_config, image_size: int) -> Transform:
    """The centre square (side min(H, W)) resized to R x R: area averaging when shrinking (a
    proper antialiasing filter at a third of the antialiased bilinear's cost: the host's
    whole job in device mode), bilinear when enlarging."""
    size = eval_crops.resize_size(image_size, input_config)

    def transform(image, seed):
        del seed
        shape = tf.shape(image)
        side = tf.minimum(shape[0], shape[1])
        top, left = eval_crops.center_crop_box(shape[0], shape[1], side)
        square = tf.slice(image, tf.stack([top, left, 0]), tf.stack([side, side, 3]))
        x = tf.cond(side > size,
                    lambda: tf.image.resize(square, [size, size], method="area"),
                    lambda: tf.image.resize(square, [size, size], method="bilinear"))
        x = tf.cast(tf.round(tf.clip_by_value(x, 0.0, 255.0)), tf.uint8)
        return {"image": tf.reshape(x, [size, size, 3])}

    return transform


# ----------------------------------------------------------------------------------------------

TRANSFORMS: dict[str, Callable[..., Transform]] = {
    "moco_v2": moco_v2,
    "train_crop_flip": train_crop_flip,
    "eval_center": eval_center,
    "ten_crop": ten_crop,
    "stored_uint8": stored_uint8,
}


def get_transform(name: str, input_config, *, image_size: int) -> Transform:
    """``f(image uint8 [H, W, 3], seed int [2]) -> dict`` of float32 arrays (see module docstring)."""
    if name not in TRANSFORMS:
        raise ValueError(f"Unknown transform {name!r}; known: {sorted(TRANSFORMS)}.")
    return TRANSFORMS[name](input_config, int(image_size))
