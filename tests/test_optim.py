"""dvp_jax/optim.py: learning-rate scaling, schedules (incl. SEED's) and SGD vs torch.optim.SGD."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dvp_jax import config_base, optim


def _optim(**kw):
    c = config_base.optim_config(base_lr=0.1)
    for k, v in kw.items():
        c[k] = v
    return c


def _lr(schedule, step):
    return float(schedule(jnp.asarray(step)))


def test_peak_lr_is_per_256_images():
    assert optim.peak_learning_rate(_optim(base_lr=0.1), 512) == pytest.approx(0.2)
    assert optim.peak_learning_rate(_optim(base_lr=30.0), 64) == pytest.approx(7.5)


def test_cosine_with_linear_warmup_from_zero_to_zero():
    s = optim.make_schedule(_optim(schedule="cosine", warmup_epochs=2.0), global_batch=256,
                            steps_per_epoch=10, num_epochs=10.0)
    assert _lr(s, 0) == 0.0
    assert _lr(s, 10) == pytest.approx(0.05)           # half-way through the warm-up
    assert _lr(s, 20) == pytest.approx(0.1)            # peak at the end of the warm-up
    assert _lr(s, 60) == pytest.approx(0.05, abs=1e-7)  # half-way through the cosine (80 steps)
    assert _lr(s, 100) == pytest.approx(0.0, abs=1e-9)  # endpoint
    assert _lr(s, 99) == pytest.approx(0.05 * (1 + math.cos(math.pi * 79 / 80)), rel=1e-4)


def test_step_boundaries_round_epochs_to_steps():
    # Epoch 1.26 at 10 steps/epoch -> step 13 (rounded); the drop applies FROM that step.
    s = optim.make_schedule(_optim(schedule="step", decay_epochs=(1.26, 3.0)), global_batch=256,
                            steps_per_epoch=10, num_epochs=5.0)
    assert [_lr(s, k) for k in (0, 12)] == pytest.approx([0.1, 0.1])
    assert [_lr(s, k) for k in (13, 29)] == pytest.approx([0.01, 0.01])
    assert _lr(s, 30) == pytest.approx(0.001)


def test_seed_epoch_cosine_matches_seeds_adjust_learning_rate():
    """jacobswan1/SEED: per epoch; warm-up from base_lr to base_lr*B/256 over 5 epochs, then
    peak * (1 + cos(pi * epoch / 200)) / 2."""
    c = _optim(base_lr=0.03, schedule="seed_epoch_cosine", warmup_epochs=5.0)
    s = optim.make_schedule(c, global_batch=256, steps_per_epoch=7, num_epochs=200.0)
    # Batch 256: constant 0.03 for epochs 0..4 (the warm-up goes from 0.03 to 0.03).
    assert [_lr(s, 7 * e + 3) for e in range(5)] == pytest.approx([0.03] * 5)
    assert _lr(s, 7 * 5) == pytest.approx(0.03 * 0.5 * (1 + math.cos(math.pi * 5 / 200)))
    assert _lr(s, 7 * 100) == pytest.approx(0.015)
    assert _lr(s, 7 * 199 + 6) == pytest.approx(0.03 * 0.5 * (1 + math.cos(math.pi * 199 / 200)),
                                                 rel=1e-3)
    # Constant inside an epoch.
    assert _lr(s, 7 * 50) == _lr(s, 7 * 50 + 6)
    # Batch 512: warm-up 0.03, 0.036, ..., 0.054, then the cosine from 0.06.
    s = optim.make_schedule(c, global_batch=512, steps_per_epoch=7, num_epochs=200.0)
    assert [_lr(s, 7 * e) for e in range(5)] == pytest.approx([0.03, 0.036, 0.042, 0.048, 0.054])
    assert _lr(s, 7 * 6) == pytest.approx(0.06 * 0.5 * (1 + math.cos(math.pi * 6 / 200)))


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.9, False, 0.0), (0.9, True, 1e-2),
                                                  (0.0, False, 5e-2), (0.9, False, 1e-1)])
def test_sgd_matches_torch(momentum, nesterov, wd):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(3, 4)).astype(np.float32)
    targets = rng.normal(size=(5, 3, 4)).astype(np.float32)
    lrs = [0.1, 0.1, 0.05, 0.05, 0.01]

    def loss(w, t):
        return 0.5 * jnp.sum((w - t) ** 2 * jnp.arange(1, 5, dtype=jnp.float32))

    c = _optim(momentum=momentum, nesterov=nesterov, weight_decay=wd)
    tx = optim.make_optimizer(c, lambda step: jnp.asarray(lrs)[step])
    params = {"w": jnp.asarray(w0)}
    state = tx.init(params)
    for k in range(5):
        grads = jax.grad(lambda p: loss(p["w"], targets[k]))(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)

    tw = torch.nn.Parameter(torch.tensor(w0))
    opt = torch.optim.SGD([tw], lr=lrs[0], momentum=momentum, nesterov=nesterov, weight_decay=wd)
    scale = torch.arange(1, 5, dtype=torch.float32)
    for k in range(5):
        for group in opt.param_groups:
            group["lr"] = lrs[k]
        opt.zero_grad()
        (0.5 * ((tw - torch.tensor(targets[k])) ** 2 * scale).sum()).backward()
        opt.step()
    np.testing.assert_allclose(np.asarray(params["w"]), tw.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_weight_decay_mask_skips_bn_and_bias():
    c = _optim(momentum=0.0, weight_decay=0.5, exclude_bn_and_bias_from_wd=True)
    tx = optim.make_optimizer(c, lambda step: 1.0)
    params = {"conv": {"kernel": jnp.ones(2)}, "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert np.allclose(updates["conv"]["kernel"], -0.5)
    assert np.allclose(updates["bn"]["scale"], 0.0) and np.allclose(updates["bn"]["bias"], 0.0)


def test_seed_presets_use_seeds_schedule():
    from configs import seed_distill as seed_distill_configs
    c = seed_distill_configs.get_config("imagenet")
    s = optim.make_schedule(c.optim, global_batch=c.batch_size, steps_per_epoch=5004,
                            num_epochs=c.num_epochs)
    assert [_lr(s, 5004 * e) for e in (0, 4)] == pytest.approx([0.03, 0.03])
    assert _lr(s, 5004 * 5 + 17) == pytest.approx(0.015 * (1 + math.cos(math.pi * 5 / 200)))
    assert _lr(s, 5004 * 150) == pytest.approx(0.015 * (1 + math.cos(math.pi * 150 / 200)))
    assert c.model.variant == "seed_distill"
