"""EfficientNet-B0 (a SEED student): torchvision's definition, or SEED's own (``variant``).

torchvision: ``features`` (stem, 7 MBConv stages, 1x1 conv to 1280, SiLU) -> avg-pool ->
``classifier`` = Dropout(0.2) -> Linear(1280, classes). 'pooled' is the 1280-d average after
the last SiLU (SiLU >= -0.279, so it can be slightly negative); our classifier is the Linear.
BatchNorm: torch defaults (eps 1e-5, momentum 0.1), as torchvision's B0.

Stochastic depth (torchvision: 0.2 x block_index / 16 per block, training only) is implemented
(``EfficientNetB0.stochastic_depth_prob``); ``models.build`` turns it off for 'torchvision'.

``variant='seed_distill'``: the definition SEED trains (EfficientNet-PyTorch by lukemelas, vendored in
jacobswan1/SEED): the same blocks and parameter tree (same parameter count), with BatchNorm
eps 1e-3 and momentum 0.01 (TF's 0.99), TensorFlow 'SAME' padding (the extra pixel of a
stride-2 conv at the bottom / right), drop-connect 0.2 x block_index / 16 (``models.build``
sets stochastic_depth_prob 0.2) and Dropout(0.2) on 'pooled' in training (before the head).
Both need a 'dropout' rng in training.

Parameter tree under ``params['backbone']``::

    features_0/{conv, bn}                          stem 3x3 s2 conv, SiLU   (features.0.0/.1)
    features_{s}_{b}/[expand]/depthwise/se/project MBConv block b of stage s = 1..7
        (features.s.b.block.k); expand, depthwise, project: {conv, bn}; se: {fc1, fc2}
    features_8/{conv, bn}                          1x1 conv to 1280, SiLU   (features.8.0/.1)

Named features (block outputs, linear): 'stage1' = features_2 (stride 4, 24 ch),
'stage2' = features_3 (stride 8, 40), 'stage3' = features_5 (stride 16, 112),
'stage4' = features_7 (stride 32, 320); strides halve with ``small_stem`` (stem stride 1).
The last BN of each stage (OFD) is ``features_{s}_{last}/project/bn``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dvp_jax import choices
from dvp_jax.models.layers import (ConvBNAct, SqueezeExcitation, StochasticDepth,
                                   global_avg_pool, make_divisible)

Dtype = Any

# (expand_ratio, kernel, stride, input, out, num_layers): torchvision's B0 bneck_conf.
B0 = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
STAGES = (2, 3, 5, 7)  # features index of the 4 named stages
VARIANTS = choices.MODEL_VARIANTS
# variant -> keyword arguments of every ConvBNAct (BN eps, torch-convention momentum, padding).
CONV_SETTINGS = {"torchvision": dict(bn_epsilon=1e-5, bn_momentum=0.1, tf_same=False),
                 "seed_distill": dict(bn_epsilon=1e-3, bn_momentum=0.01, tf_same=True)}
SEED_DROPOUT = 0.2
SEED_DROP_CONNECT = 0.2


class MBConv(nn.Module):
    """torchvision's MBConv. x: [B,H,W,Cin] -> [B,H/s,W/s,out] (linear output)."""
    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    stochastic_depth_prob: float = 0.0
    bn_groups: int = 1
    zero_init_residual: bool = False
    variant: str = "torchvision"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(bn_groups=self.bn_groups, dtype=self.dtype, **CONV_SETTINGS[self.variant])
        use_res = self.stride == 1 and self.input_channels == self.out_channels
        expanded = make_divisible(self.input_channels * self.expand_ratio, 8)
        y = x
        if expanded != self.input_channels:
            y = ConvBNAct(expanded, 1, act=nn.silu, name="expand", **kw)(y, train)
        y = ConvBNAct(expanded, self.kernel, self.stride, groups=expanded, act=nn.silu,
                      name="depthwise", **kw)(y, train)
        y = SqueezeExcitation(max(1, self.input_channels // 4), act=nn.silu, gate=nn.sigmoid,
                              dtype=self.dtype, name="se")(y)
        zero = self.zero_init_residual and use_res
        y = ConvBNAct(self.out_channels, 1, act=None, name="project",
                      bn_scale_init=nn.initializers.zeros if zero else nn.initializers.ones,
                      **kw)(y, train)
        if use_res:  # Drop-connect of EfficientNet-PyTorch = torchvision's row-wise StochasticDepth.
            y = StochasticDepth(self.stochastic_depth_prob)(y, train) + x
        return y


class EfficientNetB0(nn.Module):
    """torchvision's efficientnet_b0 without its classifier.

    Call ``(x [B, H, W, 3], train) -> dict`` with 'stage1'..'stage4' (see above, in ``dtype``)
    and 'pooled' float32 [B, 4 * round8(320 w)].
    """
    width_multiplier: float = 1.0
    small_stem: bool = False
    bn_groups: int = 1
    zero_init_residual: bool = False
    stochastic_depth_prob: float = 0.0
    variant: str = "torchvision"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        if self.variant not in VARIANTS:
            raise ValueError(f"model.variant={self.variant!r}; allowed: {', '.join(VARIANTS)}.")
        adj = lambda c: make_divisible(c * self.width_multiplier, 8)
        kw = dict(bn_groups=self.bn_groups, dtype=self.dtype)
        conv_kw = dict(kw, **CONV_SETTINGS[self.variant])
        x = x.astype(self.dtype)
        x = ConvBNAct(adj(B0[0][3]), 3, 1 if self.small_stem else 2, act=nn.silu,
                      name="features_0", **conv_kw)(x, train)
        total = sum(cfg[5] for cfg in B0)
        block_id = 0
        out: dict[str, jax.Array] = {}
        for s, (e, k, stride, cin, cout, n) in enumerate(B0, start=1):
            cin, cout = adj(cin), adj(cout)
            for b in range(n):
                sd = self.stochastic_depth_prob * block_id / total
                x = MBConv(e, k, stride if b == 0 else 1, cin if b == 0 else cout, cout,
                           stochastic_depth_prob=sd, zero_init_residual=self.zero_init_residual,
                           variant=self.variant, name=f"features_{s}_{b}", **kw)(x, train)
                block_id += 1
            if s in STAGES:
                out[f"stage{STAGES.index(s) + 1}"] = x
        x = ConvBNAct(4 * adj(B0[-1][4]), 1, act=nn.silu, name=f"features_{len(B0) + 1}",
                      **conv_kw)(x, train)
        pooled = global_avg_pool(x)
        if self.variant == "seed_distill":
            pooled = nn.Dropout(SEED_DROPOUT, deterministic=not train)(pooled)
        out["pooled"] = pooled
        return out


def last_bn_paths() -> list[tuple[str, ...]]:
    """Paths (inside the backbone) of the last BN of each of the 4 named stages."""
    return [(f"features_{s}_{B0[s - 1][5] - 1}", "project", "bn") for s in STAGES]
