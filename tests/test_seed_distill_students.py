"""SEED's own students (model.variant='seed_distill') beside torchvision's definitions.

Numbers from jacobswan1/SEED: its mobilenetv3_large(num_classes=1000) and EfficientNet-B0
(EfficientNet-PyTorch) have 5,483,032 and 5,288,548 parameters (as torchvision's); its
MobileNetV3 expanded block is expand -> depthwise conv -> BN -> SE -> act -> project.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dvp_jax import models
from dvp_jax.models import efficientnet, mobilenet_v3
from dvp_jax.models.layers import ConvBNAct, SqueezeExcitation, hard_sigmoid, tf_same_padding
from dvp_jax.models.spec import ModelSpec

from helpers import init_shapes, random_variables  # noqa: E402


@pytest.mark.parametrize("name,count", [("mobilenet_v3_large", 5_483_032),
                                        ("efficientnet_b0", 5_288_548)])
def test_seed_students_parameter_counts(name, count):
    seed = init_shapes(models.build(name, num_classes=1000, variant="seed_distill"), 224)
    tv = init_shapes(models.build(name, num_classes=1000), 224)
    assert models.count_params(seed["params"]) == count
    assert jax.tree.map(lambda s: s.shape, seed) == jax.tree.map(lambda s: s.shape, tv)
    with pytest.raises(ValueError, match="variant"):
        models.build(name, variant="timm")


def test_seed_mobilenet_block_puts_se_before_the_activation():
    """features_4 (24 -> 72 -> 40, k5 s2, SE, ReLU): SEED's order vs a step-by-step numpy-free
    composition of the same sub-layers; torchvision's order gives another output."""
    block = mobilenet_v3.InvertedResidual(24, 5, 72, 40, True, False, 2, variant="seed_distill")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 24)), jnp.float32)
    shapes = jax.eval_shape(lambda x: block.init(jax.random.key(0), x), x)
    v = random_variables(shapes, seed=4)
    got = block.apply(v, x)

    def sub(name, module, y):
        return module.apply({"params": v["params"][name],
                             **({"batch_stats": v["batch_stats"][name]}
                                if name in v.get("batch_stats", {}) else {})}, y)

    bn = dict(bn_epsilon=1e-5, bn_momentum=0.1)
    y = sub("expand", ConvBNAct(72, 1, act=nn.relu, **bn), x)
    y = sub("depthwise", ConvBNAct(72, 5, 2, groups=72, act=None, **bn), y)
    se = SqueezeExcitation(24, act=nn.relu, gate=hard_sigmoid)
    seed_order = sub("project", ConvBNAct(40, 1, act=None, **bn), nn.relu(sub("se", se, y)))
    tv_order = sub("project", ConvBNAct(40, 1, act=None, **bn), sub("se", se, nn.relu(y)))
    np.testing.assert_allclose(got, seed_order, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(got) - np.asarray(tv_order)).max() > 1e-2


@pytest.mark.parametrize("name,variant,settings", [
    ("mobilenet_v3_large", "seed_distill", (1e-5, 0.1)), ("mobilenet_v3_large", "torchvision", (1e-3, 0.01)),
    ("efficientnet_b0", "seed_distill", (1e-3, 0.01)), ("efficientnet_b0", "torchvision", (1e-5, 0.1))])
def test_bn_eps_and_momentum_of_each_variant(name, variant, settings):
    """Every BatchNorm the backbone calls (recorded while tracing init; nothing runs)."""
    seen = set()

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, models.BatchNorm):
            seen.add((context.module.epsilon, context.module.momentum))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        init_shapes(models.build(name, variant=variant), 32)
    assert seen == {settings}


def test_tf_same_padding_of_seed_efficientnet():
    assert tf_same_padding(224, 3, 2) == (0, 1)  # The extra pixel goes at the end.
    assert tf_same_padding(225, 3, 2) == (1, 1)
    assert tf_same_padding(14, 5, 2) == (1, 2)
    assert tf_same_padding(7, 5, 1) == (2, 2) and tf_same_padding(9, 1, 1) == (0, 0)
    layer = ConvBNAct(4, 3, 2, tf_same=True)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 8, 8, 3)), jnp.float32)
    v = layer.init(jax.random.key(0), x)
    got = layer.apply(v, x)
    k = v["params"]["conv"]["kernel"]
    ref = jax.lax.conv_general_dilated(x, k, (2, 2), [(0, 1), (0, 1)],
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ref = ref / jnp.sqrt(1.0 + 1e-5)  # Fresh BN statistics (mean 0, var 1), eps 1e-5 default.
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    seed = models.build("efficientnet_b0", variant="seed_distill")
    assert seed.backbone.stochastic_depth_prob == pytest.approx(efficientnet.SEED_DROP_CONNECT)
    assert models.build("efficientnet_b0").backbone.stochastic_depth_prob == 0.0


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "efficientnet_b0"])
def test_seed_students_drop_out_pooled_in_training_only(name):
    """Dropout(0.2) is the last layer before 'pooled' (the head's input), active in training
    only; torchvision's variant has none. Traced with eval_shape (nothing runs)."""
    def dropouts(variant, train):
        model = models.build(name, variant=variant, small_stem=True, width_multiplier=0.5)
        calls = []

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if isinstance(context.module, nn.Dropout):
                calls.append((context.module.rate, context.module.deterministic, out.shape))
            return out

        x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
        variables = init_shapes(model, 16)
        with nn.intercept_methods(record):
            out = jax.eval_shape(lambda v, x: model.apply(
                v, x, train=train, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}),
                variables, x)[0]
        return calls, out["pooled"].shape

    width = 1280 if name == "mobilenet_v3_large" else 640  # SEED keeps 1280 for MobileNet.
    assert dropouts("seed_distill", True) == ([(0.2, False, (2, width))], (2, width))
    assert dropouts("seed_distill", False)[0] == [(0.2, True, (2, width))]
    assert dropouts("torchvision", True)[0] == []


def test_readout_refuses_a_student_of_the_other_variant():
    """Both variants have the same shapes, so only the recorded variant tells them apart."""
    import types
    from configs import classify as classify_configs
    from dvp_jax.trainers import classify
    config = classify_configs.get_config("linear_runlocal")
    config.model.name = "mobilenet_v3_large"
    source = types.SimpleNamespace(spec=ModelSpec("mobilenet_v3_large", variant="seed_distill"),
                                   directory="runs/seed_mbv3/checkpoints")
    with pytest.raises(ValueError, match="--config.model.variant=seed_distill"):
        classify.check_backbone(None, config, source, "config.classify.init_checkpoint")
