"""Building blocks shared by every backbone: split ("grouped") BatchNorm, torch-style
initialisers, convolutions with torch's symmetric padding, stochastic depth.

All tensors are NHWC. Parameters are always float32; ``dtype`` is the compute dtype of
convolutions / dense layers (``jnp.bfloat16`` for mixed precision). BatchNorm statistics and
normalisation are always computed in float32.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dvp_jax.models import cpu_conv

Dtype = Any
Initializer = Callable[..., jax.Array]

# torch.nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu'): N(0, 2 / fan_out),
# fan_out = out_channels * kh * kw (for grouped convs too; flax's HWIO kernel gives the same).
# jax's "normal" distribution is the untruncated one, as torch's.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_linear_kernel_init() -> Initializer:
    """torch.nn.Linear's default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for [in, out]."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> Initializer:
    """torch.nn.Linear's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nn.Module):
    """BatchNorm over the last (channel) axis with PyTorch semantics and optional split BN.

    Training (``use_running_average=False``): the batch [B, ...] is viewed as [G, B/G, ...]
    with ``G = groups``; mean and biased variance are computed per group over (B/G, H, W) and
    used to normalise that group. ``groups=1`` is ordinary BN over the whole (global) batch,
    i.e. synced BN under a sharded jit. With the batch sharded over G devices, ``groups=G``
    keeps statistics device-local (contiguous chunks of B/G examples; MoCo's SplitBatchNorm
    interleaves examples instead, which is statistically equivalent after the key shuffle).

    Running statistics (collection 'batch_stats': 'mean', 'var', float32 [C]) follow torch:
    ``new = (1 - momentum) * old + momentum * batch_stat`` with momentum 0.1 by default, the
    running variance updated with the UNBIASED batch variance (n / (n - 1), n = elements per
    group per channel); with G groups the G groups' statistics are averaged (as MoCo's
    SplitBatchNorm does). Not updated while initialising.

    Inference (``use_running_average=True``): normalises with the running statistics.

    Parameters 'scale' (init ``scale_init``, default ones) and 'bias' (zeros), float32 [C].
    Statistics and normalisation are computed in float32; the output is cast to ``dtype``
    (default: the input's dtype).
    """
    use_running_average: bool | None = None
    groups: int = 1
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """x: [B, ..., C] -> same shape, dtype ``self.dtype or x.dtype``."""
        use_ra = nn.merge_param("use_running_average", self.use_running_average,
                                use_running_average)
        c = x.shape[-1]
        scale = self.param("scale", self.scale_init, (c,), jnp.float32)
        bias = self.param("bias", self.bias_init, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        out_dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)

        if use_ra:
            mul = scale * lax.rsqrt(ra_var.value + self.epsilon)
            y = x32 * mul + (bias - ra_mean.value * mul)
            return y.astype(out_dtype)

        b = x.shape[0]
        g = self.groups
        if g < 1:
            raise ValueError(f"BatchNorm groups must be >= 1, got {g}.")
        if b % g:
            if self.is_initializing():
                g = 1  # Init only creates variables; the outputs are not used.
            else:
                raise ValueError(
                    f"BatchNorm with groups={g} (split BN) needs a batch divisible by {g}; "
                    f"got a batch of {b}. Use a per-step batch that is a multiple of bn_groups.")
        xg = x32.reshape((g, b // g) + x.shape[1:])
        axes = tuple(range(1, xg.ndim - 1))
        mean = jnp.mean(xg, axis=axes, keepdims=True)                      # [G, 1.., C]
        var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)    # biased
        mul = scale * lax.rsqrt(var + self.epsilon)
        y = (xg * mul + (bias - mean * mul)).reshape(x.shape)

        if not self.is_initializing():
            n = (b // g) * math.prod(x.shape[1:-1])
            unbias = n / max(n - 1, 1)
            batch_mean = jnp.mean(mean.reshape(g, c), axis=0)
            batch_var = jnp.mean(var.reshape(g, c), axis=0) * unbias
            m = self.momentum
            ra_mean.value = (1.0 - m) * ra_mean.value + m * batch_mean
            ra_var.value = (1.0 - m) * ra_var.value + m * batch_var
        return y.astype(out_dtype)


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'SAME' padding of one spatial side (EfficientNet-PyTorch's
    Conv2dStaticSamePadding): total max((ceil(n / s) - 1) * s + k - n, 0), the extra pixel
    at the end (bottom / right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv(features: int, kernel: int, stride: int = 1, *, groups: int = 1, use_bias: bool = False,
         dtype: Dtype = jnp.float32, name: str | None = None,
         kernel_init: Initializer = kaiming_normal_fan_out,
         padding: Sequence[tuple[int, int]] | None = None) -> nn.Conv:
    """A torch-like Conv2d: symmetric padding (kernel - 1) // 2 (or ``padding``, ((top, bottom),
    (left, right))), HWIO float32 kernel.

    The convolution goes through ``cpu_conv.conv_general_dilated``: by default on the CPU
    backend only, its formulations avoid XLA:CPU's slow paths (feature maps smaller than the
    kernel; 1x1 weight-gradients) with the same results; on GPU/TPU it is XLA's convolution.
    The environment variable ``DVP_CPU_CONV=fast|xla`` overrides the default (cpu_conv.py).
    """
    p = (kernel - 1) // 2
    pads = ((p, p), (p, p)) if padding is None else tuple(tuple(x) for x in padding)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=pads, feature_group_count=groups, use_bias=use_bias,
                   dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
                   bias_init=nn.initializers.zeros, name=name,
                   conv_general_dilated=cpu_conv.conv_general_dilated)


class ConvBNAct(nn.Module):
    """torchvision's Conv2dNormActivation: conv (no bias) 'conv' -> BatchNorm 'bn' -> act.

    x: [B, H, W, Cin] -> [B, H/stride, W/stride, features] in ``dtype``.
    """
    features: int
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    act: Callable[[jax.Array], jax.Array] | None = None
    bn_groups: int = 1
    bn_momentum: float = 0.1
    bn_epsilon: float = 1e-5
    bn_scale_init: Initializer = nn.initializers.ones
    tf_same: bool = False  # TensorFlow 'SAME' padding (EfficientNet-PyTorch) instead of torch's.
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        padding = None
        if self.tf_same:
            padding = [tf_same_padding(n, self.kernel, self.stride) for n in x.shape[1:3]]
        x = conv(self.features, self.kernel, self.stride, groups=self.groups, dtype=self.dtype,
                 name="conv", padding=padding)(x)
        x = BatchNorm(use_running_average=not train, groups=self.bn_groups,
                      momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
                      scale_init=self.bn_scale_init, name="bn")(x)
        return x if self.act is None else self.act(x)


class SqueezeExcitation(nn.Module):
    """torchvision's SqueezeExcitation: avg-pool -> 1x1 conv 'fc1' (bias) -> act -> 1x1 conv
    'fc2' (bias) -> gate -> x * gate. x: [B, H, W, C] -> same."""
    squeeze_channels: int
    act: Callable[[jax.Array], jax.Array] = nn.relu
    gate: Callable[[jax.Array], jax.Array] = nn.sigmoid
    kernel_init: Initializer = kaiming_normal_fan_out
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
        s = conv(self.squeeze_channels, 1, use_bias=True, dtype=self.dtype, name="fc1",
                 kernel_init=self.kernel_init)(s)
        s = self.act(s)
        s = conv(c, 1, use_bias=True, dtype=self.dtype, name="fc2", kernel_init=self.kernel_init)(s)
        return x * self.gate(s).astype(x.dtype)


class StochasticDepth(nn.Module):
    """torchvision's StochasticDepth(p, 'row'): in training, drops each example's residual
    branch with probability p and scales survivors by 1 / (1 - p). Needs a 'dropout' rng
    when ``p > 0`` and ``train``. x: [B, ...] -> same."""
    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if not train or self.rate <= 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


def global_avg_pool(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, C] float32 mean over H, W."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's _make_divisible (channel rounding of MobileNet / EfficientNet)."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def hard_swish(x: jax.Array) -> jax.Array:
    """torch.nn.Hardswish: x * relu6(x + 3) / 6."""
    return x * jax.nn.relu6(x + 3.0) / 6.0


def hard_sigmoid(x: jax.Array) -> jax.Array:
    """torch.nn.Hardsigmoid: relu6(x + 3) / 6."""
    return jax.nn.relu6(x + 3.0) / 6.0
