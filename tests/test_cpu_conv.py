"""dvp_jax.models.cpu_conv: forward and gradients equal lax.conv_general_dilated's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dvp_jax.models import cpu_conv

DN = ("NHWC", "HWIO", "NHWC")

# (batch, H, Cin, Cout, kernel, stride, pad): the small-spatial cases (H*W < k*k, input or
# output) take the explicit-padding path; 1x1 kernels take the matmul weight-gradient.
SHAPES = [
    (2, 2, 8, 8, 3, 1, 1),     # 3x3 on 2x2 (ResNet stage 4 at 64 px)
    (2, 4, 8, 16, 3, 2, 1),    # 3x3/2 4x4 -> 2x2 (input-gradient path)
    (2, 5, 8, 16, 1, 2, 0),    # 1x1/2 downsample, odd size
    (2, 9, 3, 8, 7, 2, 3),     # 7x7/2 stem
]


def _loss(conv_fn, s, p):
    def f(x, w):
        y = conv_fn(x, w, (s, s), ((p, p), (p, p)), dimension_numbers=DN)
        return jnp.sum(jnp.sin(y)), y
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)


# Tolerance 1e-4 (max abs difference / max abs reference): both paths compute the same sums in
# float32 (eps 1.2e-7), only in another order; with at most a few hundred terms per output
# (7*7*3 forward, B*Ho*Wo per weight-gradient entry) the rounding differences stay ~1e-6 of
# the largest value. A wrong padding, stride, flip or transpose gives differences of order 1.
def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30)


@pytest.fixture(autouse=True)
def _force_fast():
    cpu_conv.use_fast_cpu_conv(True)
    yield
    cpu_conv.use_fast_cpu_conv(None)


def test_forward_and_grads_match_xla():
    def both(x, w):  # One jitted program per shape for the reference and the fast path.
        return (_loss(lax.conv_general_dilated, s, p)(x, w),
                _loss(cpu_conv.conv_general_dilated, s, p)(x, w))

    for i, (b, h, ci, co, k, s, p) in enumerate(SHAPES):
        kx, kw = jax.random.split(jax.random.key(i))
        x = jax.random.normal(kx, (b, h, h, ci), jnp.float32)
        w = jax.random.normal(kw, (k, k, ci, co), jnp.float32) / np.sqrt(k * k * ci)
        ((_, y_ref), (dx_ref, dw_ref)), ((_, y), (dx, dw)) = jax.jit(both)(x, w)
        assert y.shape == y_ref.shape
        for name, a, r in (("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)):
            assert _rel(r, a) < 1e-4, (SHAPES[i], name, _rel(r, a))


def test_small_spatial_avoids_swapped_conv():
    # The XLA operand swap (dim_labels 01fb_...) is what makes these convs ~100x slower.
    x = jnp.ones((2, 2, 2, 8))
    w = jnp.ones((3, 3, 8, 8))

    def f(x, w):
        y = cpu_conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)
        return jnp.sum(y ** 2)

    hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).compile().as_text()
    assert "01fb" not in hlo


def test_grouped_dilated_and_flax_module_fall_back_or_match():
    kx, kw = jax.random.split(jax.random.key(7))
    x = jax.random.normal(kx, (2, 6, 6, 8))
    w = jax.random.normal(kw, (3, 3, 4, 8))
    ref = lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2),
                                   dimension_numbers=DN, feature_group_count=2)
    out = cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2),
                                        dimension_numbers=DN, feature_group_count=2)
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(out))

    import flax.linen as nn
    kwargs = dict(features=8, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                  use_bias=True)
    variables = nn.Conv(**kwargs).init(jax.random.key(0), x)
    fast = cpu_conv.Conv(**kwargs)
    assert jax.tree.map(jnp.shape, fast.init(jax.random.key(0), x)) == \
        jax.tree.map(jnp.shape, variables)
    assert _rel(nn.Conv(**kwargs).apply(variables, x), fast.apply(variables, x)) < 1e-5


def test_switch_off_uses_plain_xla():
    cpu_conv.use_fast_cpu_conv(False)
    x = jnp.ones((1, 2, 2, 4))
    w = jnp.ones((3, 3, 4, 4))
    txt = jax.jit(lambda x, w: cpu_conv.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)).lower(x, w).as_text()
    assert "optimization_barrier" not in txt


@pytest.mark.parametrize("env, enabled", [("xla", False), ("fast", True), ("", True)])
def test_the_switch_reads_the_environment_and_logs_its_decision(monkeypatch, caplog, env, enabled):
    """DVP_CPU_CONV decides (unset: on for the CPU backend these tests run on), once, logged."""
    import logging
    monkeypatch.setenv("DVP_CPU_CONV", env)
    cpu_conv.use_fast_cpu_conv(None)  # Decide again on the next use.
    with caplog.at_level(logging.INFO, logger="dvp_jax"):
        assert cpu_conv.fast_cpu_conv_enabled() is enabled
        assert cpu_conv.fast_cpu_conv_enabled() is enabled  # Logged once, not per call.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("convolutions:")]
    assert len(lines) == 1 and ("cpu_conv" in lines[0]) == enabled, lines
    assert (f"DVP_CPU_CONV={env}" in lines[0]) if env else ("'cpu' backend" in lines[0])


def test_a_resnet_computes_the_same_with_the_switch_on_and_off():
    """The model the digits presets train, run once through each path (the switch is read when
    a function is traced, so each path gets its own jitted function), gives the same outputs and
    gradients. Stage 4 of a small-stem ResNet-18 on 16 px is 2x2, so the small-spatial forward,
    the written-out input-gradient and the 1x1 matmul weight-gradient are all exercised.

    Tolerance: both paths compute the same sums in float32 (unit roundoff 6e-8) and differ only
    in summation order; the longest reduction here has 3 * 3 * 32 = 288 terms (a conv) or
    2 * 8 * 8 = 128 (a 1x1 weight-gradient), so one layer's relative difference is at most
    ~288 * 6e-8 = 2e-5 in the worst case; 1e-4 of each array's largest value leaves room for
    that to compound over the 20 convolutions forward and backward (measured: at most 1.6e-6
    over the 66 arrays), while a wrong padding, stride or flipped kernel differs by order 1."""
    from dvp_jax import models
    model = models.build("resnet18", small_stem=True, width_multiplier=0.0625,
                         projection_dims=(16, 8))
    x = jax.random.normal(jax.random.key(3), (2, 16, 16, 3), jnp.float32)
    variables = model.init(jax.random.key(0), x, train=False)

    def run():  # A new function each time: jit's cache must not reuse the other path's trace.
        def loss(params, x):
            out = model.apply({**variables, "params": params}, x, train=False)
            return jnp.sum(jnp.sin(out["projection"])), out["pooled"]
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        text = fn.lower(variables["params"], x).as_text()
        return fn(variables["params"], x), "optimization_barrier" in text

    cpu_conv.use_fast_cpu_conv(True)
    ((_, pooled_fast), grads_fast), barrier_fast = run()
    cpu_conv.use_fast_cpu_conv(False)
    ((_, pooled_xla), grads_xla), barrier_xla = run()
    assert barrier_fast and not barrier_xla  # The two runs really took different paths.
    assert _rel(pooled_xla, pooled_fast) < 1e-4
    flat_fast = jax.tree_util.tree_leaves_with_path(grads_fast)
    flat_xla = jax.tree_util.tree_leaves(grads_xla)
    assert len(flat_fast) == len(flat_xla) > 40
    for (path, a), r in zip(flat_fast, flat_xla):
        assert _rel(r, a) < 1e-4, (jax.tree_util.keystr(path), _rel(r, a))
