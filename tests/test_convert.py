"""The PyTorch -> Flax key mapping, without torch: round trips, torchvision key names, prefix
detection, and the errors for missing / unexpected keys and shape mismatches."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dvp_jax import models
from dvp_jax.models import torch_weights


def _variables(name, seed=0, res=64, **kw):
    model = models.build(name, **kw)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                            jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        scale = math.sqrt(2.0 / math.prod(s.shape[:-1])) if path[-1].key == "kernel" else 1.0
        return (rng.normal(size=s.shape) * scale).astype(np.float32)

    return jax.tree.map_with_path(fill, shapes)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name,kw", [
    ("resnet18", dict(num_classes=10)),
    ("resnet50", dict(projection_dims=(64, 16), small_stem=True, width_multiplier=0.5)),
    ("resnext50_32x4d", dict(num_classes=3)),
    ("mobilenet_v3_large", dict(num_classes=10)),
    ("efficientnet_b0", dict(num_classes=10)),
])
def test_round_trip_and_inferred_kwargs(name, kw):
    v = _variables(name, **kw)
    sd = torch_weights.flax_to_torch_state_dict(v, name)
    sd.update({k.replace("running_mean", "num_batches_tracked"): np.array(5)
               for k in sd if k.endswith("running_mean")})        # ignored by the converter
    v2, kwargs = torch_weights.torch_state_dict_to_flax(sd, name)
    _assert_trees_equal(v, v2)
    for k, val in kw.items():
        assert kwargs[k] == (list(val) if isinstance(val, tuple) else val), k
    models.build(name, **kwargs)   # the kwargs build the model


def test_torchvision_key_names():
    sd = torch_weights.flax_to_torch_state_dict(_variables("resnet50", num_classes=4), "resnet50")
    for k in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight",
              "layer1.0.downsample.1.running_mean", "layer3.5.conv3.weight", "fc.weight",
              "fc.bias"):
        assert k in sd, k
    assert sd["layer1.0.conv2.weight"].shape == (64, 64, 3, 3)       # OIHW
    assert sd["fc.weight"].shape == (4, 2048)                         # [out, in]
    sd = torch_weights.flax_to_torch_state_dict(_variables("resnet18", projection_dims=(32, 8)),
                                          "resnet18")
    assert sd["fc.0.weight"].shape == (32, 512) and sd["fc.2.weight"].shape == (8, 32)
    mb = torch_weights.flax_to_torch_state_dict(_variables("mobilenet_v3_large", num_classes=4),
                                          "mobilenet_v3_large")
    for k in ("features.0.0.weight", "features.1.block.0.0.weight",      # no expand in block 1
              "features.1.block.1.1.running_var", "features.4.block.2.fc1.weight",
              "features.4.block.3.0.weight", "features.16.1.weight", "classifier.0.weight",
              "classifier.3.weight"):
        assert k in mb, k
    assert mb["features.4.block.1.0.weight"].shape == (72, 1, 5, 5)   # depthwise
    en = torch_weights.flax_to_torch_state_dict(_variables("efficientnet_b0", num_classes=4),
                                          "efficientnet_b0")
    for k in ("features.1.0.block.0.0.weight", "features.1.0.block.1.fc2.bias",
              "features.1.0.block.2.1.running_mean", "features.2.1.block.0.0.weight",
              "features.6.3.block.3.0.weight", "features.8.0.weight", "classifier.1.weight"):
        assert k in en, k


def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def test_prefix_detection_of_moco_seed_and_ofd_layouts():
    q = torch_weights.flax_to_torch_state_dict(_variables("resnet18", projection_dims=(32, 8)),
                                         "resnet18")
    k = torch_weights.flax_to_torch_state_dict(_variables("resnet18", seed=1, projection_dims=(32, 8)),
                                         "resnet18")
    moco = {**_prefixed(q, "module.encoder_q."), **_prefixed(k, "module.encoder_k."),
            "module.queue": np.zeros((8, 16), np.float32), "module.queue_ptr": np.zeros(1)}
    assert torch_weights.detect_prefix(moco, "resnet18") == "module.encoder_q."
    v, kw = torch_weights.torch_state_dict_to_flax(moco, "resnet18")
    assert kw["projection_dims"] == [32, 8] and kw["num_classes"] == 0
    np.testing.assert_array_equal(v["params"]["projection"]["dense1"]["kernel"],
                                  q["fc.2.weight"].T)
    seed = {**_prefixed(q, "module.student."), **_prefixed(k, "module.teacher.")}
    assert torch_weights.detect_prefix(seed, "resnet18") == "module.student."
    ofd = {**_prefixed(q, "module.s_net."), **_prefixed(k, "module.t_net."),
           "module.Connectors.0.0.weight": np.zeros((64, 64, 1, 1), np.float32)}
    assert torch_weights.detect_prefix(ofd, "resnet18") == "module.s_net."
    assert torch_weights.detect_prefix(q, "resnet18") == ""
    assert torch_weights.detect_prefix(_prefixed(q, "module."), "resnet18") == "module."
    with pytest.raises(torch_weights.ConversionError, match="Several"):
        torch_weights.detect_prefix({**_prefixed(q, "a."), **_prefixed(k, "b.")}, "resnet18")
    with pytest.raises(torch_weights.ConversionError, match="No resnet18 backbone"):
        torch_weights.detect_prefix({"x.weight": np.zeros(1)}, "resnet18")


def test_shape_mismatch_missing_and_unexpected_keys_are_named():
    sd = torch_weights.flax_to_torch_state_dict(_variables("resnet18", num_classes=10), "resnet18")
    bad = dict(sd, **{"layer2.1.conv1.weight": np.zeros((128, 128, 1, 1), np.float32)})
    with pytest.raises(torch_weights.ConversionError,
                       match=r"layer2\.1\.conv1\.weight.*\(128, 128, 1, 1\).*\(128, 128, 3, 3\)"):
        torch_weights.torch_state_dict_to_flax(bad, "resnet18")
    missing = {k: v for k, v in sd.items() if k != "layer3.0.bn2.running_var"}
    with pytest.raises(torch_weights.ConversionError, match=r"missing key 'layer3\.0\.bn2\.running_var'"):
        torch_weights.torch_state_dict_to_flax(missing, "resnet18")
    extra = dict(sd, **{"layer1.0.attn.weight": np.zeros(3, np.float32)})
    with pytest.raises(torch_weights.ConversionError, match=r"unexpected key 'layer1\.0\.attn\.weight'"):
        torch_weights.torch_state_dict_to_flax(extra, "resnet18")
    with pytest.raises(torch_weights.ConversionError):   # a resnet18 checkpoint is no resnet34
        torch_weights.torch_state_dict_to_flax(sd, "resnet34")
    with pytest.raises(torch_weights.ConversionError, match=r"missing key 'layer1\.0\.conv1\.weight'"):
        torch_weights.torch_state_dict_to_flax(_prefixed(sd, "net."), "resnet18", prefix="")
    with pytest.raises(torch_weights.ConversionError, match="No key starts with prefix 'model.'"):
        torch_weights.torch_state_dict_to_flax(sd, "resnet18", prefix="model.")
    with pytest.raises(ValueError, match="allowed names"):
        torch_weights.torch_state_dict_to_flax(sd, "vgg16")


def test_num_classes_keep_require_add_and_drop():
    sd = torch_weights.flax_to_torch_state_dict(_variables("resnet18", num_classes=10), "resnet18")
    _, kw = torch_weights.torch_state_dict_to_flax(sd, "resnet18", num_classes=10)
    assert kw["num_classes"] == 10
    with pytest.raises(torch_weights.ConversionError, match="10 outputs"):
        torch_weights.torch_state_dict_to_flax(sd, "resnet18", num_classes=100)
    v, kw = torch_weights.torch_state_dict_to_flax(sd, "resnet18", num_classes=0)
    assert kw["num_classes"] == 0 and set(v["params"]) == {"backbone"}
    bare = {k: x for k, x in sd.items() if not k.startswith("fc.")}
    v, kw = torch_weights.torch_state_dict_to_flax(bare, "resnet18", num_classes=7)
    assert kw["num_classes"] == 7
    assert v["params"]["classifier"]["kernel"].shape == (512, 7)
    assert np.abs(v["params"]["classifier"]["kernel"]).max() <= 1 / math.sqrt(512)
