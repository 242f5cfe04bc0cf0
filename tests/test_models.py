"""The model zoo: parameter counts vs torchvision, tree layout, named features, split BN,
bf16 compute. Fast: shapes via jax.eval_shape, forward passes on 32-64 px, batch 2-4."""
import math
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dvp_jax import models
from dvp_jax.models.layers import BatchNorm
from dvp_jax.models.spec import ModelSpec
from helpers import init_shapes, random_variables  # noqa: E402

# torchvision's parameter counts with a 1,000-class classifier (BN running stats excluded).
TORCHVISION_COUNTS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808, "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336, "wide_resnet50_2": 68_883_240,
    "mobilenet_v3_large": 5_483_032, "efficientnet_b0": 5_288_548,
}


def _out_shapes(model, variables, res, batch=2):
    return jax.eval_shape(lambda v, x: model.apply(v, x, False), variables,
                          jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32))


# ---------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", sorted(TORCHVISION_COUNTS))
def test_param_count_equals_torchvision(name):
    shapes = init_shapes(models.build(name, num_classes=1000), 224)
    assert models.count_params(shapes["params"]) == TORCHVISION_COUNTS[name]


def test_registry_names_and_unknown_name():
    assert set(models.NAMES) == set(TORCHVISION_COUNTS)
    with pytest.raises(ValueError, match="resnet50.*efficientnet_b0"):
        models.build("resnet51")


def test_model_spec_round_trips_and_builds_the_same_model():
    import json
    import ml_collections
    model_config = ml_collections.ConfigDict(dict(
        name="resnet18", small_stem=True, width_multiplier=0.125, dtype="float32",
        zero_init_residual=False, variant="torchvision", bn_groups=99))  # Options override it.
    spec = ModelSpec.from_config(model_config, projection_dims=[16, 8], bn_groups=2)
    assert spec.projection_dims == (16, 8) and spec.bn_groups == 2 and spec.num_classes == 0
    meta = json.loads(json.dumps(spec.to_meta()))  # As a checkpoint stores it.
    assert ModelSpec.from_meta(meta) == spec and hash(ModelSpec.from_meta(meta)) == hash(spec)
    assert ModelSpec.from_meta({"name": "resnet18"}) == ModelSpec("resnet18")  # Old, short meta.
    built = spec.build()
    direct = models.build("resnet18", projection_dims=(16, 8), bn_groups=2, small_stem=True,
                          width_multiplier=0.125)
    x = jnp.zeros((2, 16, 16, 3))
    shapes = jax.eval_shape(lambda: built.init(jax.random.PRNGKey(0), x, train=False))
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(
        lambda a: a.shape, jax.eval_shape(lambda: direct.init(jax.random.PRNGKey(0), x,
                                                              train=False)))
    with pytest.raises(ValueError, match="unknown keys \\['width'\\]"):
        ModelSpec.from_meta({"name": "resnet18", "width": 2})


def test_tree_layout_with_and_without_heads():
    m = models.build("resnet18", num_classes=10, projection_dims=(64, 16))
    v = init_shapes(m, 32)
    assert set(v) == {"params", "batch_stats"}
    assert set(v["params"]) == {"backbone", "projection", "classifier"}
    assert set(v["batch_stats"]) == {"backbone"}
    assert v["params"]["classifier"]["kernel"].shape == (512, 10)
    assert v["params"]["classifier"]["bias"].shape == (10,)
    assert v["params"]["projection"]["dense0"]["kernel"].shape == (512, 64)
    assert v["params"]["projection"]["dense1"]["kernel"].shape == (64, 16)
    bb = v["params"]["backbone"]
    assert bb["conv1"]["kernel"].shape == (7, 7, 3, 64)
    assert set(bb["layer2_0"]) == {"conv1", "bn1", "conv2", "bn2", "downsample_conv",
                                   "downsample_bn"}
    assert set(v["batch_stats"]["backbone"]["bn1"]) == {"mean", "var"}
    bare = init_shapes(models.build("resnet18"), 32)
    assert set(bare["params"]) == {"backbone"}
    # Phase 2 copies params['backbone'] from a Phase-1 model: the trees must be identical.
    assert jax.tree.structure(bare["params"]["backbone"]) == jax.tree.structure(bb)


def test_options_small_stem_width_multiplier_and_dtype():
    m = models.build("resnet50", small_stem=True, width_multiplier=0.5)
    v = init_shapes(m, 32)
    assert v["params"]["backbone"]["conv1"]["kernel"].shape == (3, 3, 3, 32)
    out = _out_shapes(m, v, 32)
    assert out["stage1"].shape == (2, 32, 32, 128)
    assert out["pooled"].shape == (2, 1024)
    mb = models.build("resnet18", num_classes=5, projection_dims=(8, 4), dtype="bfloat16")
    vb = init_shapes(mb, 32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(vb))  # fp32 params
    ob = _out_shapes(mb, vb, 32)
    assert ob["stage2"].dtype == jnp.bfloat16
    for k in ("pooled", "projection", "logits"):
        assert ob[k].dtype == jnp.float32, k


# ---------------------------------------------------------------------- named features

FEATURE_CASES = [
    # name, res, small_stem, stage channels, stage spatial sizes
    ("resnet18", 32, True, (64, 128, 256, 512), (32, 16, 8, 4)),
    ("resnet18", 64, False, (64, 128, 256, 512), (16, 8, 4, 2)),
    ("resnet50", 32, True, (256, 512, 1024, 2048), (32, 16, 8, 4)),
    ("resnet50", 64, False, (256, 512, 1024, 2048), (16, 8, 4, 2)),
    ("mobilenet_v3_large", 64, False, (24, 40, 112, 160), (16, 8, 4, 2)),
    ("efficientnet_b0", 64, False, (24, 40, 112, 320), (16, 8, 4, 2)),
    ("efficientnet_b0", 32, True, (24, 40, 112, 320), (16, 8, 4, 2)),
]


@pytest.mark.parametrize("name,res,small,chans,sizes", FEATURE_CASES)
def test_named_feature_shapes(name, res, small, chans, sizes):
    m = models.build(name, num_classes=7, projection_dims=(32, 16), small_stem=small)
    out = _out_shapes(m, init_shapes(m, res), res, batch=2)
    for i, (c, s) in enumerate(zip(chans, sizes)):
        assert out[f"stage{i + 1}"].shape == (2, s, s, c)
    pooled_dim = {"resnet18": 512, "resnet50": 2048}.get(name, 1280)
    assert out["pooled"].shape == (2, pooled_dim)
    assert out["projection"].shape == (2, 16)
    assert out["logits"].shape == (2, 7)


@pytest.mark.parametrize("name,res,small", [("resnet18", 32, True), ("resnet50", 64, False)])
def test_stages_are_pre_relu_and_pooled_is_post_relu(name, res, small):
    m = models.build(name, num_classes=3, small_stem=small)
    v = random_variables(init_shapes(m, res), seed=1)
    x = np.random.default_rng(2).normal(size=(2, res, res, 3)).astype(np.float32)
    out = jax.jit(lambda v, x: m.apply(v, x, False))(v, x)
    for k in ("stage1", "stage2", "stage3", "stage4"):
        assert float(out[k].min()) < 0.0, k       # pre-ReLU
        assert float(out[k].max()) > 0.0, k
    assert float(out["pooled"].min()) >= 0.0
    np.testing.assert_allclose(out["pooled"], np.maximum(out["stage4"], 0).mean(axis=(1, 2)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        out["logits"], out["pooled"] @ v["params"]["classifier"]["kernel"]
        + v["params"]["classifier"]["bias"], rtol=1e-5, atol=1e-5)


def test_train_mode_updates_batch_stats_only_in_backbone():
    m = models.build("resnet18", num_classes=3, projection_dims=(8, 4), small_stem=True)
    v = random_variables(init_shapes(m, 16), seed=3)
    x = np.random.default_rng(4).normal(size=(4, 16, 16, 3)).astype(np.float32)
    out, upd = jax.jit(lambda v, x: m.apply(v, x, True, mutable=["batch_stats"]))(v, x)
    assert set(upd) == {"batch_stats"} and set(upd["batch_stats"]) == {"backbone"}
    old, new = v["batch_stats"]["backbone"]["bn1"]["mean"], upd["batch_stats"]["backbone"]["bn1"]["mean"]
    assert not np.allclose(old, new)
    assert out["logits"].shape == (4, 3)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v3_large",
                                  "efficientnet_b0"])
def test_last_bn_of_stages_matches_stage_channels(name):
    m = models.build(name)
    v = init_shapes(m, 64)
    out = _out_shapes(m, v, 64)
    bns = models.last_bn_of_stages(v, name)
    assert len(bns) == 4
    for i, bn in enumerate(bns):
        c = out[f"stage{i + 1}"].shape[-1]
        assert set(bn) == {"scale", "bias", "mean", "var"}
        assert all(bn[k].shape == (c,) for k in bn)
    assert models.last_bn_paths("resnet50") == [("layer1_2", "bn3"), ("layer2_3", "bn3"),
                                                ("layer3_5", "bn3"), ("layer4_2", "bn3")]
    assert models.last_bn_paths("resnet18")[3] == ("layer4_1", "bn2")


@pytest.mark.parametrize("block,last", [("BasicBlock", "bn2"), ("Bottleneck", "bn3")])
def test_zero_init_residual_zeroes_last_bn_gamma(block, last):
    from dvp_jax.models import resnet
    cls = getattr(resnet, block)
    x = jnp.zeros((1, 4, 4, 64 * cls.expansion))
    blk = cls(planes=64, zero_init_residual=True)
    v = jax.jit(lambda x: blk.init(jax.random.key(0), x))(x)
    assert np.all(np.asarray(v["params"][last]["scale"]) == 0.0)
    assert np.all(np.asarray(v["params"]["bn1"]["scale"]) == 1.0)
    # torchvision's kaiming_normal_(mode='fan_out', nonlinearity='relu'): std sqrt(2 / fan_out).
    k = np.asarray(v["params"]["conv2"]["kernel"])           # [3, 3, 64, 64]
    assert abs(k.std() / math.sqrt(2.0 / (64 * 9)) - 1.0) < 0.05


# ------------------------------------------------------------------------ BatchNorm


def _bn_apply(bn, x, mean0, var0, scale, bias, train):
    v = {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": mean0, "var": var0}}
    if train:
        return bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    return bn.apply(v, x, use_running_average=True), None


def _bn_inputs(c=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, size=(8, 3, 4, c)).astype(np.float32)
    x[4:] += 3.0   # groups with different statistics
    mean0 = rng.normal(size=c).astype(np.float32)
    var0 = rng.uniform(0.5, 2.0, size=c).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, size=c).astype(np.float32)
    bias = rng.normal(size=c).astype(np.float32)
    return x, mean0, var0, scale, bias


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_split_bn_matches_numpy(groups):
    x, mean0, var0, scale, bias = _bn_inputs()
    y, upd = _bn_apply(BatchNorm(groups=groups), x, mean0, var0, scale, bias, train=True)
    xg = x.astype(np.float64).reshape(groups, -1, *x.shape[1:])
    m = xg.mean(axis=(1, 2, 3), keepdims=True)
    v = xg.var(axis=(1, 2, 3), keepdims=True)                         # biased: normalise
    ref = ((xg - m) / np.sqrt(v + 1e-5) * scale + bias).reshape(x.shape)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    n = xg.shape[1] * x.shape[1] * x.shape[2]
    v_unbiased = v.reshape(groups, -1) * n / (n - 1)                  # running: unbiased
    np.testing.assert_allclose(upd["batch_stats"]["mean"],
                               0.9 * mean0 + 0.1 * m.reshape(groups, -1).mean(0), rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"],
                               0.9 * var0 + 0.1 * v_unbiased.mean(0), rtol=1e-5)


def test_bn_groups_1_matches_flax_batchnorm():
    x, mean0, var0, scale, bias = _bn_inputs(seed=1)
    y, upd = _bn_apply(BatchNorm(groups=1), x, mean0, var0, scale, bias, train=True)
    ref, ref_upd = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5).apply(
        {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": mean0, "var": var0}},
        x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], ref_upd["batch_stats"]["mean"],
                               rtol=1e-6)


def test_bn_inference_uses_running_stats_and_bf16_keeps_fp32_stats():
    x, mean0, var0, scale, bias = _bn_inputs(seed=2)
    y, _ = _bn_apply(BatchNorm(), x, mean0, var0, scale, bias, train=False)
    np.testing.assert_allclose(y, (x - mean0) / np.sqrt(var0 + 1e-5) * scale + bias,
                               rtol=1e-5, atol=1e-5)
    yb, updb = _bn_apply(BatchNorm(groups=2), x.astype(jnp.bfloat16), mean0, var0, scale, bias,
                         train=True)
    y32, upd32 = _bn_apply(BatchNorm(groups=2), x.astype(jnp.bfloat16).astype(np.float32),
                           mean0, var0, scale, bias, train=True)
    assert yb.dtype == jnp.bfloat16 and updb["batch_stats"]["var"].dtype == jnp.float32
    np.testing.assert_allclose(updb["batch_stats"]["var"], upd32["batch_stats"]["var"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(yb, np.float32), y32, rtol=1e-2, atol=2e-2)


def test_bn_batch_not_divisible_by_groups_is_an_error():
    x, mean0, var0, scale, bias = _bn_inputs()
    with pytest.raises(ValueError, match="groups=3"):
        _bn_apply(BatchNorm(groups=3), x, mean0, var0, scale, bias, train=True)


def test_split_bn_sharded_over_devices_matches_numpy():
    """groups = number of devices, batch sharded over a 'data' mesh axis under jit."""
    code = textwrap.dedent("""
        import numpy as np, jax, jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, AxisType
        from dvp_jax.models.layers import BatchNorm
        assert jax.device_count() == 4
        mesh = Mesh(np.asarray(jax.devices()), ("data",), axis_types=(AxisType.Auto,))
        x = np.random.default_rng(0).normal(size=(8, 2, 2, 3)).astype(np.float32)
        x[2:4] += 5.0
        v = {"params": {"scale": np.ones(3, np.float32), "bias": np.zeros(3, np.float32)},
             "batch_stats": {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)}}
        f = jax.jit(lambda v, x: BatchNorm(groups=4).apply(v, x, use_running_average=False,
                                                           mutable=["batch_stats"]))
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        y, upd = f(v, xs)
        xg = x.reshape(4, 2, 2, 2, 3)
        m, var = xg.mean((1, 2, 3), keepdims=True), xg.var((1, 2, 3), keepdims=True)
        np.testing.assert_allclose(y, ((xg - m) / np.sqrt(var + 1e-5)).reshape(x.shape),
                                   rtol=1e-5, atol=1e-5)
        assert y.sharding.spec[0] == "data"
        # Normalisation statistics stay on each device: no collective for groups = devices
        # (only the [C] running-stat average needs one), but one for synced BN (groups=1).
        def collectives(groups):
            g = jax.jit(lambda v, x: BatchNorm(groups=groups).apply(
                v, x, use_running_average=False, mutable=["batch_stats"])[0])
            return g.lower(v, xs).compile().as_text().count("all-reduce(")
        assert collectives(4) == 0 and collectives(1) > 0, (collectives(4), collectives(1))
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


# ---------------------------------------------------------------------------- bf16


def test_bf16_compute_close_to_fp32():
    """Same fp32 weights; bf16 convs/dense. Stated tolerance: relative L2 error of 'pooled'
    and 'projection' < 2e-2 for ResNet-18, inference-mode BN (measured 3.5e-3) and train-mode
    BN (measured 1.0e-2). (A random ResNet-50 in train-mode BN is chaotic: rounding only its
    weights to bf16 in an fp32 forward already moves 'pooled' by ~10%, so it is not a test.)"""
    kw = dict(num_classes=5, projection_dims=(32, 8), small_stem=True)
    m32 = models.build("resnet18", **kw)
    m16 = models.build("resnet18", dtype="bfloat16", **kw)
    v = random_variables(init_shapes(m32, 32), seed=5)
    x = np.random.default_rng(6).normal(size=(4, 32, 32, 3)).astype(np.float32)
    for train in (False, True):
        mut = ["batch_stats"] if train else False
        o32 = jax.jit(lambda v, x: m32.apply(v, x, train, mutable=mut))(v, x)
        o16 = jax.jit(lambda v, x: m16.apply(v, x, train, mutable=mut))(v, x)
        if train:
            (o32, u32), (o16, u16) = o32, o16
            assert jax.tree.all(jax.tree.map(lambda a: a.dtype == jnp.float32, u16))
        for k in ("pooled", "projection"):
            assert o16[k].dtype == jnp.float32
            rel = np.linalg.norm(o16[k] - o32[k]) / np.linalg.norm(o32[k])
            assert rel < 2e-2, (train, k, rel)
