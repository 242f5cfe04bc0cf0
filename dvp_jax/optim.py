"""SGD and learning-rate schedules, in PyTorch's semantics (see config_base.optim_config).

PyTorch's SGD adds weight_decay * param to the gradient before momentum, and applies the
learning rate after the momentum buffer (p -= lr * buf); ``optax.add_decayed_weights``
followed by ``optax.sgd`` is exactly that, Nesterov included.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dvp_jax import choices


def peak_learning_rate(optim_config, global_batch: int) -> float:
    """base_lr is per 256 images: lr = base_lr * global_batch / 256."""
    return optim_config.base_lr * global_batch / 256


def seed_epoch_lr(optim_config, global_batch: int, epoch, num_epochs: float):
    """SEED's released ``adjust_learning_rate`` (jacobswan1/SEED), set once per epoch.

    epoch e (0-based) < warmup_epochs: base + (peak - base) * e / warmup_epochs, with
    base = optim.base_lr and peak = base * global_batch / 256 (at batch 256 the lr is constant);
    then peak * (1 + cos(pi * e / num_epochs)) / 2: the cosine runs over ALL epochs, warm-up
    included, so at e = warmup it starts a little below peak. Works on Python and jnp numbers.
    """
    base = optim_config.base_lr
    peak = peak_learning_rate(optim_config, global_batch)
    warm = optim_config.warmup_epochs
    if warm > 0:
        ramp = base + (peak - base) * epoch / warm
    else:
        ramp = peak
    cosine = peak * 0.5 * (1.0 + jnp.cos(math.pi * epoch / num_epochs))
    return jnp.where(epoch < warm, ramp, cosine)


def make_schedule(optim_config, *, global_batch: int, steps_per_epoch: int,
                  num_epochs: float) -> optax.Schedule:
    """step -> learning rate. 'cosine' (half cosine to 0, optional linear warm-up from 0),
    'step' (x decay_factor at each of decay_epochs, each rounded to a whole step), 'constant',
    'seed_epoch_cosine' (SEED's per-epoch schedule, see ``seed_epoch_lr``; warm-up included)."""
    peak = peak_learning_rate(optim_config, global_batch)
    if optim_config.schedule == "seed_epoch_cosine":
        spe = max(1, int(steps_per_epoch))
        return lambda step: seed_epoch_lr(optim_config, global_batch, jnp.asarray(step) // spe,
                                          num_epochs)
    total = max(1, int(round(num_epochs * steps_per_epoch)))
    warmup = int(round(optim_config.warmup_epochs * steps_per_epoch))
    kind = optim_config.schedule
    if kind == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps=max(1, total - warmup))
    elif kind == "step":
        boundaries = {int(round(e * steps_per_epoch)) - warmup: optim_config.decay_factor
                      for e in optim_config.decay_epochs}
        main = optax.piecewise_constant_schedule(peak, boundaries)
    elif kind == "constant":
        main = optax.constant_schedule(peak)
    else:
        raise ValueError(f"config.optim.schedule={kind!r}; allowed: {', '.join(choices.SCHEDULES)}.")
    if warmup <= 0:
        return main
    # Linear warm-up from 0 to peak over `warmup` steps (MoCo/SEED style), then `main`.
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def _decay_mask(params: Any) -> Any:
    """True for weights that get weight decay: every leaf but BN scales/biases and biases."""
    def keep(path, _):
        last = getattr(path[-1], "key", str(path[-1]))
        return last not in ("bias", "scale")
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim_config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD(momentum, nesterov) with coupled L2 weight decay, following ``schedule``."""
    mask: Any = _decay_mask if optim_config.exclude_bn_and_bias_from_wd else None
    return optax.chain(
        optax.add_decayed_weights(optim_config.weight_decay, mask=mask),
        optax.sgd(schedule, momentum=optim_config.momentum or None,
                  nesterov=optim_config.nesterov),
    )


def global_norm(tree: Any) -> jax.Array:
    """sqrt(sum of squares) over all leaves, float32 (for logging gradient norms)."""
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def cosine_momentum(base: float, step: jax.Array, total_steps: int) -> jax.Array:
    """BYOL-style ramp of the EMA momentum from ``base`` at step 0 to 1 at ``total_steps``."""
    progress = jnp.minimum(step / max(1, total_steps), 1.0)
    return 1.0 - (1.0 - base) * (jnp.cos(math.pi * progress) + 1.0) / 2.0

