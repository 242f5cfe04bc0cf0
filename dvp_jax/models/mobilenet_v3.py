"""MobileNetV3-Large (a SEED student): torchvision's definition, or SEED's own (``variant``).

torchvision: ``features`` (stem, 15 inverted-residual blocks, 1x1 conv to 960) -> avg-pool ->
``classifier`` = Linear(960, 1280) -> Hardswish -> Dropout(0.2) -> Linear(1280, classes).
Here the Linear(960, 1280) + Hardswish belongs to the BACKBONE (module 'classifier_0'), so
'pooled' is the 1280-d vector after that Hardswish (it can be slightly negative: Hardswish >=
-0.375) and our classifier is one Linear(1280, classes): parameter counts equal torchvision's
and every architecture's classifier is a single linear layer on 'pooled'.

BatchNorm: torchvision's eps 1e-3 and momentum 0.01 (torch convention).

``variant='seed_distill'``: the definition SEED trains (jacobswan1/SEED's mobilenetv3.py): the same
blocks and parameter tree (so the same parameter count at width <= 1), but in the expanded
blocks the squeeze-excitation comes BEFORE the depthwise activation (expand -> depthwise conv
-> BN -> SE -> act -> project; torchvision: ... BN -> act -> SE), BatchNorm eps 1e-5 and
momentum 0.1 (torch defaults), SE layers initialised N(0, 0.01) with bias 0 (its SE uses
Linear layers), the 1280-d layer kept at 1280 for widths <= 1, and Dropout(0.2) on 'pooled'
in training (before the head; needs a 'dropout' rng).

Parameter tree under ``params['backbone']``::

    features_0/{conv, bn}                      stem 3x3 s2 conv, Hardswish  (features.0.0/.1)
    features_{i}/[expand]/depthwise/[se]/project   blocks i = 1..15 (features.i.block.k):
        expand, depthwise, project: {conv, bn};  se: {fc1, fc2} (1x1 convs with bias)
    features_16/{conv, bn}                     1x1 conv to 960, Hardswish     (features.16.0/.1)
    classifier_0/{kernel, bias}                Dense(960 -> 1280)             (classifier.0)

Named features (linear, i.e. pre-activation: block outputs have no activation):
'stage1' = features_3 (stride 4, 24 ch), 'stage2' = features_6 (stride 8, 40 ch),
'stage3' = features_12 (stride 16, 112 ch), 'stage4' = features_15 (stride 32, 160 ch);
strides are halved with ``small_stem`` (stem stride 1). The last BN of each stage (OFD) is
``features_{3,6,12,15}/project/bn``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dvp_jax import choices
from dvp_jax.models.layers import (ConvBNAct, SqueezeExcitation, global_avg_pool, hard_sigmoid,
                                   kaiming_normal_fan_out,
                                   hard_swish, make_divisible)

Dtype = Any
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
VARIANTS = choices.MODEL_VARIANTS
# variant -> (BN epsilon, BN momentum in torch's convention).
BN_SETTINGS = {"torchvision": (BN_EPS, BN_MOMENTUM), "seed_distill": (1e-5, 0.1)}
SEED_DROPOUT = 0.2

# (input, kernel, expanded, out, use_se, activation, stride): torchvision's bneck_conf.
LARGE = (
    (16, 3, 16, 16, False, "RE", 1),
    (16, 3, 64, 24, False, "RE", 2),
    (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2),
    (80, 3, 200, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 480, 112, True, "HS", 1),
    (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2),
    (160, 5, 960, 160, True, "HS", 1),
    (160, 5, 960, 160, True, "HS", 1),
)
LAST_CHANNEL = 1280
STAGE_BLOCKS = (3, 6, 12, 15)  # features index ending each of the 4 named stages


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV3 InvertedResidual. x: [B,H,W,Cin] -> [B,H/s,W/s,out] (linear)."""
    input_channels: int
    kernel: int
    expanded: int
    out_channels: int
    use_se: bool
    use_hs: bool
    stride: int
    bn_groups: int = 1
    zero_init_residual: bool = False
    variant: str = "torchvision"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        act = hard_swish if self.use_hs else nn.relu
        eps, momentum = BN_SETTINGS[self.variant]
        kw = dict(bn_groups=self.bn_groups, bn_momentum=momentum, bn_epsilon=eps,
                  dtype=self.dtype)
        use_res = self.stride == 1 and self.input_channels == self.out_channels
        expands = self.expanded != self.input_channels
        # SEED's expanded blocks: depthwise conv -> BN -> SE -> act (torchvision: act -> SE).
        se_first = self.variant == "seed_distill" and expands and self.use_se
        se_init = (nn.initializers.normal(0.01) if self.variant == "seed_distill"
                   else kaiming_normal_fan_out)
        y = x
        if expands:
            y = ConvBNAct(self.expanded, 1, act=act, name="expand", **kw)(y, train)
        y = ConvBNAct(self.expanded, self.kernel, self.stride, groups=self.expanded,
                      act=None if se_first else act, name="depthwise", **kw)(y, train)
        if self.use_se:
            y = SqueezeExcitation(make_divisible(self.expanded // 4, 8), act=nn.relu,
                                  gate=hard_sigmoid, kernel_init=se_init, dtype=self.dtype,
                                  name="se")(y)
        if se_first:
            y = act(y)
        zero = self.zero_init_residual and use_res
        y = ConvBNAct(self.out_channels, 1, act=None, name="project",
                      bn_scale_init=nn.initializers.zeros if zero else nn.initializers.ones,
                      **kw)(y, train)
        return y + x if use_res else y


class MobileNetV3Large(nn.Module):
    """torchvision's mobilenet_v3_large without its last Linear (see the module docstring).

    Call ``(x [B, H, W, 3], train) -> dict`` with 'stage1'..'stage4' (see above, in ``dtype``)
    and 'pooled' float32 [B, round8(1280 w)].
    """
    width_multiplier: float = 1.0
    small_stem: bool = False
    bn_groups: int = 1
    zero_init_residual: bool = False
    variant: str = "torchvision"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        if self.variant not in VARIANTS:
            raise ValueError(f"model.variant={self.variant!r}; allowed: {', '.join(VARIANTS)}.")
        w = self.width_multiplier
        adj = lambda c: make_divisible(c * w, 8)
        eps, momentum = BN_SETTINGS[self.variant]
        kw = dict(bn_groups=self.bn_groups, dtype=self.dtype)
        x = x.astype(self.dtype)
        x = ConvBNAct(adj(LARGE[0][0]), 3, 1 if self.small_stem else 2, act=hard_swish,
                      bn_momentum=momentum, bn_epsilon=eps, name="features_0", **kw)(x, train)
        out: dict[str, jax.Array] = {}
        for i, (cin, k, cexp, cout, se, act, s) in enumerate(LARGE, start=1):
            x = InvertedResidual(adj(cin), k, adj(cexp), adj(cout), se, act == "HS", s,
                                 zero_init_residual=self.zero_init_residual,
                                 variant=self.variant, name=f"features_{i}", **kw)(x, train)
            if i in STAGE_BLOCKS:
                out[f"stage{STAGE_BLOCKS.index(i) + 1}"] = x
        last_in = adj(LARGE[-1][3])
        x = ConvBNAct(6 * last_in, 1, act=hard_swish, bn_momentum=momentum, bn_epsilon=eps,
                      name=f"features_{len(LARGE) + 1}", **kw)(x, train)
        x = global_avg_pool(x).astype(self.dtype)
        seed = self.variant == "seed_distill"
        last = LAST_CHANNEL if seed and w <= 1.0 else adj(LAST_CHANNEL)
        x = nn.Dense(last, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros,
                     name="classifier_0")(x)
        x = hard_swish(x)
        if seed:
            x = nn.Dropout(SEED_DROPOUT, deterministic=not train)(x)
        out["pooled"] = x.astype(jnp.float32)
        return out


def last_bn_paths() -> list[tuple[str, ...]]:
    """Paths (inside the backbone) of the last BN of each of the 4 named stages."""
    return [(f"features_{i}", "project", "bn") for i in STAGE_BLOCKS]
