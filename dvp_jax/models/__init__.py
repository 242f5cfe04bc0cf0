"""The model zoo: a name -> constructor registry so configs say ``model.name``.

    model = build('resnet50', projection_dims=(2048, 128), bn_groups=8)
    variables = model.init(rng, x, train=False)          # x: float [B, H, W, 3] NHWC
    out, updates = model.apply(variables, x, True, mutable=['batch_stats'])
    out['stage1'..'stage4']  # per-stage feature maps [B, h, w, C] (pre-ReLU for ResNets)
    out['pooled']            # float32 [B, C], global average after the final activation
    out['projection']        # float32 [B, projection_dims[-1]] if projection_dims (not normalised)
    out['logits']            # float32 [B, num_classes] if num_classes > 0

Variables: params = {'backbone', 'projection' (if projection_dims), 'classifier' (if
num_classes)}; batch_stats = {'backbone'}. Backbone trees are documented in resnet.py,
mobilenet_v3.py and efficientnet.py.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dvp_jax.models import efficientnet, mobilenet_v3, resnet
from dvp_jax.models.heads import Classifier, Model, ProjectionHead
from dvp_jax.models.layers import BatchNorm

NAMES: tuple[str, ...] = tuple(resnet.CONFIGS) + ("mobilenet_v3_large", "efficientnet_b0")

__all__ = ["NAMES", "build", "last_bn_of_stages", "last_bn_paths", "count_params", "Model",
           "ProjectionHead", "Classifier", "BatchNorm"]


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"Unknown model name {name!r}; allowed names: {', '.join(NAMES)}.")


def build(name: str, *, num_classes: int = 0, projection_dims: Sequence[int] = (),
          bn_groups: int = 1, small_stem: bool = False, width_multiplier: float = 1.0,
          dtype: str | Any = "float32", zero_init_residual: bool = False,
          variant: str = "torchvision") -> nn.Module:
    """The Model (backbone + heads) registered as ``name``.

    Args:
      name: one of ``NAMES``.
      num_classes: size of the linear classifier on 'pooled' (0: none).
      projection_dims: MLP head dims, e.g. (2048, 128) (empty: none).
      bn_groups: split-BN groups of every backbone BatchNorm (1: ordinary / synced BN).
      small_stem: 3x3 stride-1 stem without max-pool (ResNets; MobileNet / EfficientNet: stem
        stride 1) for 32-64 px inputs.
      width_multiplier: scales every backbone channel width.
      dtype: compute dtype ('float32' or 'bfloat16'); params, BN statistics and the outputs
        'pooled', 'projection', 'logits' stay float32.
      zero_init_residual: the last BN gamma of each residual block starts at 0.
      variant: 'torchvision' or 'seed_distill' (SEED's own MobileNetV3 / EfficientNet-B0 definitions,
        see mobilenet_v3.py and efficientnet.py; they use dropout in training, so their
        training step needs a 'dropout' rng). ResNets are the same in both.
    """
    _check_name(name)
    dt = jnp.dtype(dtype)
    common = dict(small_stem=bool(small_stem), width_multiplier=float(width_multiplier),
                  bn_groups=int(bn_groups), zero_init_residual=bool(zero_init_residual), dtype=dt)
    if name in resnet.CONFIGS:
        backbone = resnet.ResNet(**resnet.CONFIGS[name], **common)
    elif variant not in mobilenet_v3.VARIANTS:
        raise ValueError(f"model.variant={variant!r}; allowed: {', '.join(mobilenet_v3.VARIANTS)}.")
    elif name == "mobilenet_v3_large":
        backbone = mobilenet_v3.MobileNetV3Large(variant=variant, **common)
    else:  # efficientnet_b0
        drop_connect = efficientnet.SEED_DROP_CONNECT if variant == "seed_distill" else 0.0
        backbone = efficientnet.EfficientNetB0(stochastic_depth_prob=drop_connect,
                                               variant=variant, **common)
    return Model(backbone=backbone, num_classes=int(num_classes),
                 projection_dims=tuple(int(d) for d in projection_dims), dtype=dt)


def last_bn_paths(name: str) -> list[tuple[str, ...]]:
    """Paths inside params['backbone'] / batch_stats['backbone'] of the BN that ends each of
    the 4 named stages (its output, plus the identity where the block is residual, is the
    stage's pre-activation output). ResNet-50: [('layer1_2', 'bn3'), ('layer2_3', 'bn3'),
    ('layer3_5', 'bn3'), ('layer4_2', 'bn3')]."""
    _check_name(name)
    if name in resnet.CONFIGS:
        return resnet.last_bn_paths(name)
    if name == "mobilenet_v3_large":
        return mobilenet_v3.last_bn_paths()
    return efficientnet.last_bn_paths()


def last_bn_of_stages(variables: dict, name: str) -> list[dict]:
    """For OFD's margins: the last BN of each of the 4 stages of model ``name``.

    Args:
      variables: {'params': {'backbone': ...}, 'batch_stats': {'backbone': ...}} (a model's
        variables; 'batch_stats' optional).
    Returns:
      4 dicts (stage1..stage4), each {'scale', 'bias'} float32 [C_s] (gamma, beta) plus
      {'mean', 'var'} [C_s] when batch_stats are given.
    """
    params = variables["params"]
    params = params["backbone"] if "backbone" in params else params
    stats = variables.get("batch_stats") or {}
    stats = stats.get("backbone", stats)
    result = []
    for path in last_bn_paths(name):
        p = params
        for k in path:
            p = p[k]
        entry = {"scale": p["scale"], "bias": p["bias"]}
        if stats:
            s = stats
            for k in path:
                s = s[k]
            entry.update(mean=s["mean"], var=s["var"])
        result.append(entry)
    return result


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))
