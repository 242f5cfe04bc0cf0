"""A drop-in ``lax.conv_general_dilated`` that avoids two XLA:CPU slow paths.

Measured on XLA:CPU (jax 0.10.2, 1 core, batch 64, float32):

1. Small-spatial convolutions. When a conv's input has fewer spatial positions than its
   window (H * W < kh * kw, e.g. a 3x3 conv on the 2x2 stage-4 maps of a ResNet at 64 px, or
   the input-gradient of the stride-2 3x3 conv 4x4 -> 2x2), XLA's algebraic simplifier swaps
   the conv's operands; the swapped conv has a non-canonical layout that XLA:CPU runs with its
   naive loop emitter: 3x3 conv 512->512 on [64, 2, 2, 512] takes ~1.9-2.7 s forward and
   ~1.9 s input-gradient (0.4 GFLOP/s) instead of ~10-20 ms. Fix here: pad explicitly, hide the
   padded tensor behind ``lax.optimization_barrier`` (so the pad is not folded back into the
   conv) and run a VALID conv, whose input is never smaller than its window. The backward pass
   (custom VJP) does the same for the input-gradient (explicit dilated padding of the output
   gradient, VALID conv with the flipped, transposed kernel).
2. Weight-gradients of 1x1 convolutions: XLA:CPU runs them at 5-25 GFLOP/s; a 2-D matmul
   ``x[N, Cin]^T @ g[N, Cout]`` (N = B * Ho * Wo) runs at 40-120 GFLOP/s (3-6x faster).
   For kh, kw > 1 an im2col (patches) matmul was measured SLOWER than XLA (the patch
   materialisation costs more than it saves), so other weight-gradients stay XLA's.

Results are the same math (summation order may differ: ~1e-6 relative in float32).

Used only for 2-D NHWC/HWIO/NHWC convs with no dilation and no feature/batch groups, and only
when enabled; everything else calls ``lax.conv_general_dilated`` unchanged. The switch is
explicit and logged: enabled by default only when the default JAX backend is 'cpu' (so GPU/TPU
runs never take it); override with the environment variable ``DVP_CPU_CONV`` = 'fast' | 'xla'
(read once, at first use) or ``use_fast_cpu_conv(True/False)``. The decision and its reason are
logged once ("convolutions: ..." in log.txt). tests/test_cpu_conv.py checks the two paths
against each other (forward and both gradients).

Wiring: ``nn.Conv(..., conv_general_dilated=cpu_conv.conv_general_dilated)`` (parameters
are unchanged: 'kernel' HWIO, optional 'bias'), or the ``Conv`` module below.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_ENABLED: bool | None = None  # None: decide on first use (env var, then backend).


def use_fast_cpu_conv(enabled: bool | None) -> None:
    """Force the fast path on (True) or off (False); None restores the default (env var
    ``DVP_CPU_CONV`` = 'fast' | 'xla', else on iff ``jax.default_backend() == 'cpu'``).
    Takes effect for functions traced afterwards (already-jitted programs keep theirs)."""
    global _ENABLED
    _ENABLED = None if enabled is None else bool(enabled)


def fast_cpu_conv_enabled() -> bool:
    """Whether ``conv_general_dilated`` currently uses the CPU formulations."""
    global _ENABLED
    if _ENABLED is None:
        env = os.environ.get("DVP_CPU_CONV", "").strip().lower()
        if env in ("fast", "patches", "1", "true", "on"):
            _ENABLED, why = True, f"DVP_CPU_CONV={env}"
        elif env in ("xla", "0", "false", "off"):
            _ENABLED, why = False, f"DVP_CPU_CONV={env}"
        elif env:
            raise ValueError(f"DVP_CPU_CONV={env!r}; use 'fast' or 'xla'.")
        else:
            _ENABLED = jax.default_backend() == "cpu"
            why = f"default for the {jax.default_backend()!r} backend; DVP_CPU_CONV=fast|xla sets it"
        logging.getLogger("dvp_jax").info(
            "convolutions: %s (%s)", "dvp_jax.models.cpu_conv's CPU formulations" if _ENABLED
            else "XLA's lax.conv_general_dilated", why)
    return _ENABLED


_DN = ("NHWC", "HWIO", "NHWC")
_NHWC_SPEC = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _DN)


def _xla_conv(x, w, strides, padding, precision):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN,
                                    precision=precision)


def _forward(x, w, strides, padding, precision):
    """y = conv(x, w); avoids XLA's operand swap when the input is smaller than the window."""
    kh, kw = w.shape[:2]
    if x.shape[1] * x.shape[2] < kh * kw:
        xp = lax.pad(x, jnp.zeros((), x.dtype),
                     ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
        xp = lax.optimization_barrier(xp)
        return _xla_conv(xp, w, strides, ((0, 0), (0, 0)), precision)
    return _xla_conv(x, w, strides, padding, precision)


def _input_grad(g, w, x_shape, strides, padding, precision):
    """d conv / d x for output-gradient g [B, Ho, Wo, O] -> [B, H, W, I]."""
    kh, kw = w.shape[:2]
    if g.shape[1] * g.shape[2] >= kh * kw:
        zeros = jnp.zeros(x_shape, g.dtype)
        _, vjp = jax.vjp(lambda x: _xla_conv(x, w, strides, padding, precision), zeros)
        return vjp(g)[0]
    # Transposed conv written out: dilate g by the stride, pad, VALID conv with the flipped
    # kernel, input/output features swapped. lo = k - 1 - p_lo, hi = H + p_lo - (Ho-1) s - 1.
    pads = [(0, 0, 0)]
    for d, k in ((1, kh), (2, kw)):
        s, (p_lo, _) = strides[d - 1], padding[d - 1]
        pads.append((k - 1 - p_lo, x_shape[d] + p_lo - (g.shape[d] - 1) * s - 1, s - 1))
    pads.append((0, 0, 0))
    gp = lax.optimization_barrier(lax.pad(g, jnp.zeros((), g.dtype), pads))
    wt = jnp.flip(w, (0, 1)).swapaxes(2, 3)
    return _xla_conv(gp, wt, (1, 1), ((0, 0), (0, 0)), precision)


def _kernel_grad(x, g, w_shape, strides, padding, precision):
    """d conv / d w for input x [B, H, W, I] and output-gradient g -> HWIO ``w_shape``."""
    kh, kw, ci, co = w_shape
    if kh == 1 and kw == 1:
        if any(p != (0, 0) for p in padding):
            x = lax.pad(x, jnp.zeros((), x.dtype),
                        ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
        b, ho, wo = g.shape[:3]
        xs = lax.slice(x, (0, 0, 0, 0),
                       (b, (ho - 1) * strides[0] + 1, (wo - 1) * strides[1] + 1, ci),
                       (1, strides[0], strides[1], 1))
        dw = lax.dot_general(xs.reshape(-1, ci), g.reshape(-1, co), (((0,), (0,)), ((), ())),
                             precision=precision)
        return dw.reshape(w_shape).astype(x.dtype)
    zeros = jnp.zeros(w_shape, x.dtype)
    _, vjp = jax.vjp(lambda w: _xla_conv(x, w, strides, padding, precision), zeros)
    return vjp(g)[0]


@functools.lru_cache(maxsize=None)
def _make_conv(strides: tuple, padding: tuple, precision: Any):
    @jax.custom_vjp
    def conv(x, w):
        return _forward(x, w, strides, padding, precision)

    def fwd(x, w):
        return conv(x, w), (x, w)

    def bwd(res, g):
        x, w = res
        g = g.astype(jnp.result_type(x, w))
        dx = _input_grad(g, w, x.shape, strides, padding, precision).astype(x.dtype)
        dw = _kernel_grad(x, g, w.shape, strides, padding, precision).astype(w.dtype)
        return dx, dw

    conv.defvjp(fwd, bwd)
    return conv


def _is_nhwc(dimension_numbers, ndim) -> bool:
    if ndim != 4:
        return False
    if dimension_numbers is None:
        return False  # lax's default is NCHW / OIHW.
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return dimension_numbers == _NHWC_SPEC
    return tuple(dimension_numbers) == _DN


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None):
    """``lax.conv_general_dilated`` with the same signature and results; on CPU (see module
    docstring) 2-D NHWC/HWIO convs without dilation or groups take the faster formulations."""
    plain = (lhs_dilation is None or all(d == 1 for d in lhs_dilation)) and \
            (rhs_dilation is None or all(d == 1 for d in rhs_dilation))
    if (not fast_cpu_conv_enabled() or not plain or feature_group_count != 1
            or batch_group_count != 1 or preferred_element_type is not None
            or not _is_nhwc(dimension_numbers, lhs.ndim) or lhs.dtype != rhs.dtype):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if isinstance(precision, list):
        precision = tuple(precision)
    return _make_conv(strides, padding, precision)(lhs, rhs)


class Conv(nn.Conv):
    """``flax.linen.Conv`` (same attributes and parameters: 'kernel' HWIO, optional 'bias')
    computing with ``conv_general_dilated`` above."""
    conv_general_dilated: Any = conv_general_dilated
