"""Phase 1: the margin-MoCo train step, its queue and EMA, sharding, and resume."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import moco as moco_config
from dvp_jax import checkpoints, config_base, loop, objectives, optim, sharding
from dvp_jax.trainers import moco
from dvp_jax.models.spec import ModelSpec


def tiny_config(**moco_overrides):
    config = moco_config.get_config("runlocal")
    for k, v in moco_overrides.items():
        config.moco[k] = v
    return config


def make_parts(config, groups, total_steps=10):
    model = ModelSpec.from_config(config.model, projection_dims=config.moco.projection_dims,
                                  bn_groups=groups).build()
    schedule = optim.make_schedule(config.optim, global_batch=config.batch_size,
                                   steps_per_epoch=4, num_epochs=2)
    tx = optim.make_optimizer(config.optim, schedule)
    step = moco.make_train_step(model, tx, config.moco, total_steps=total_steps,
                                shuffle=config.moco.shuffle_bn == "split")
    init = moco.make_init_state(model, tx, config, groups)
    return model, tx, step, init


def random_batches(config, n, seed=0):
    rng = np.random.default_rng(seed)
    s = config.input.image_size
    return [{"view1": rng.normal(size=(config.batch_size, s, s, 3)).astype(np.float32),
             "view2": rng.normal(size=(config.batch_size, s, s, 3)).astype(np.float32)}
            for _ in range(n)]


def test_queue_is_a_ring_of_the_latest_keys_and_key_encoder_is_the_ema():
    config = tiny_config(queue_size=48)  # 3 batches of 16: the ring wraps after 3 steps.
    groups = 4
    model, _, step, init = make_parts(config, groups)
    state = jax.jit(init)(jax.random.PRNGKey(0))
    step = jax.jit(step)
    m = config.moco.momentum
    ema = state["key_params"]
    key_stats = state["key_batch_stats"]
    expected_rows = {}
    batches = random_batches(config, 5)
    for i, batch in enumerate(batches):
        ema = jax.tree.map(lambda k, q: m * k + (1 - m) * q, ema, state["params"])
        # The keys by hand: permute, forward with per-group BN, un-permute, normalise.
        perm = jax.random.permutation(jax.random.fold_in(state["rng"], i), config.batch_size)
        out, new_stats = model.apply({"params": ema, "batch_stats": key_stats},
                                     jnp.asarray(batch["view2"])[perm], train=True,
                                     mutable=["batch_stats"])
        key_stats = new_stats["batch_stats"]
        keys = np.asarray(objectives.l2_normalize(out["projection"]))[np.argsort(perm)]
        ptr = int(state["queue_ptr"])
        for r in range(config.batch_size):
            expected_rows[(ptr + r) % 48] = keys[r]
        state, metrics = step(state, batch)
        assert np.isfinite(float(metrics["loss"]))
    assert int(state["queue_ptr"]) == (5 * 16) % 48
    queue = np.asarray(state["queue"])
    for row, key in expected_rows.items():
        np.testing.assert_allclose(queue[row], key, atol=1e-5)
    # Rows 0..15 were written at step 4 (the latest), rows 16..31 at step 5 -> ring order.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 state["key_params"], ema)
    assert int(state["step"]) == 5


def test_refuses_queue_not_multiple_of_batch():
    with pytest.raises(ValueError, match="queue_size=100 is not a multiple of config.batch_size=16"):
        moco.check_queue(100, 16)


def test_four_devices_equal_one_device():
    """Same global batch, split BN with 4 groups: the sharded step equals the 1-device step."""
    config = tiny_config()
    _, _, step, init = make_parts(config, groups=4)
    batch = random_batches(config, 1)[0]
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:4]):
        mesh = sharding.make_mesh(devices)
        rep = sharding.replicated(mesh)
        state = jax.jit(init, out_shardings=rep)(jax.random.PRNGKey(1))
        fn = jax.jit(step, in_shardings=(rep, sharding.batch_sharded(mesh)),
                     out_shardings=(rep, rep))
        for _ in range(2):
            state, metrics = fn(state, sharding.to_global(batch, mesh))
        results.append(jax.device_get((state, metrics)))
    (s1, m1), (s4, m4) = results
    # Tolerance: the reductions (BN statistics, matmuls) are split differently across devices.
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s4)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_resume_equals_uninterrupted(tmp_path):
    config = tiny_config()
    mesh = sharding.make_mesh()
    task = moco.build_task(config, mesh)
    full = jax.device_get(loop.run(task, config, str(tmp_path / "a"), mesh))
    # Interrupted after 4 steps (a checkpoint is written there), then the same command again.
    loop.run(dataclasses.replace(task, total_steps=4), config, str(tmp_path / "b"), mesh)
    assert checkpoints.latest_step(str(tmp_path / "b" / "checkpoints")) == 4
    resumed = jax.device_get(loop.run(task, config, str(tmp_path / "b"), mesh))
    for name in ("params", "batch_stats", "key_params", "queue", "queue_ptr", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, full[name], resumed[name])
    assert os.path.exists(tmp_path / "a" / "config.json")


@pytest.mark.parametrize("batch, expected", [(64, 8), (256, 8), (16, 4), (24, 6), (6, 1)])
def test_one_data_shard_defaults_to_mocos_eight_bn_groups(batch, expected):
    """moco.bn_groups = 0 on one device: MoCo's single-GPU recipe of 8 groups, fewer when a
    group would hold fewer than 4 images; several shards keep one group per shard."""
    config = tiny_config()
    config.batch_size = batch
    one = sharding.make_mesh(jax.devices()[:1])
    assert moco.bn_groups(config, one) == expected
    config.batch_size = 64
    assert moco.bn_groups(config, sharding.make_mesh(jax.devices()[:4])) == 4
    config.moco.bn_groups = 2
    assert moco.bn_groups(config, one) == 2
    config.moco.shuffle_bn = "sync"
    assert moco.bn_groups(config, one) == 1


def test_resnet18_moco_head_is_the_reference_linear_c_c_relu_linear_c_128():
    """Parameter count = backbone + Linear(512, 512) + Linear(512, 128), as the reference."""
    from dvp_jax import models
    config = moco_config.get_config("vipriors")
    config.moco.projection_dims = config_base.moco_config().projection_dims  # (0, 128): C.
    config.model.name = "resnet18"
    config.model.small_stem = False
    config.input.image_size = 32
    dims = moco.projection_dims(config)
    assert dims == (512, 128)
    x = jnp.zeros((1, 32, 32, 3))
    count = lambda m: models.count_params(jax.eval_shape(
        lambda: m.init(jax.random.PRNGKey(0), x, train=False))["params"])
    with_head = count(models.build("resnet18", projection_dims=dims))
    backbone = count(models.build("resnet18"))
    assert backbone == 11_176_512  # torchvision resnet18 without fc.
    assert with_head == backbone + 512 * 512 + 512 + 512 * 128 + 128


def test_margin_warmup_and_margin_free_accuracy():
    config = tiny_config(margin_warmup_epochs=2.0)
    assert float(moco.margin_at(config.moco, jnp.asarray(0), 4)) == 0.0
    assert np.isclose(float(moco.margin_at(config.moco, jnp.asarray(4), 4)), 0.2)
    assert np.isclose(float(moco.margin_at(config.moco, jnp.asarray(100), 4)), 0.4)
    config = tiny_config()
    model, _, step, init = make_parts(config, 4)
    state = jax.jit(init)(jax.random.PRNGKey(0))
    batch = random_batches(config, 1)[0]
    batch["view2"] = batch["view1"]  # Identical views: q.k+ is large; the margin still hides it.
    _, metrics = jax.jit(step)(state, batch)
    # By hand from the metrics' own definitions: margin-free accuracy >= the margin one.
    assert float(metrics["contrast_acc_nomargin"]) >= float(metrics["contrast_acc"])
    assert float(metrics["positive_cos"]) > float(metrics["negative_cos"])


def test_excluded_queue_keys_are_dropped_from_the_negatives():
    """margin_info_nce with ``exclude`` equals the loss over the remaining negatives (numpy)."""
    rng = np.random.default_rng(0)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
    q, k, queue = unit(rng.normal(size=(4, 8))), unit(rng.normal(size=(4, 8))), unit(
        rng.normal(size=(6, 8)))
    exclude = rng.uniform(size=(4, 6)) < 0.4
    loss, _ = objectives.margin_info_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue),
                                         margin=0.4, temperature=0.2,
                                         exclude=jnp.asarray(exclude))
    expected = []
    for i in range(4):
        logits = np.concatenate([[q[i] @ k[i] - 0.4], queue[~exclude[i]] @ q[i]]) / 0.2
        expected.append(-logits[0] + np.log(np.exp(logits).sum()))
    np.testing.assert_allclose(float(loss), np.mean(expected), rtol=1e-5)


def test_queue_index_tracks_the_images_of_the_queue_rows():
    config = tiny_config(queue_size=32, exclude_own_keys=True)
    _, _, step, init = make_parts(config, 4)
    state = jax.jit(init)(jax.random.PRNGKey(0))
    step = jax.jit(step)
    batch = random_batches(config, 1)[0]
    batch["index"] = np.arange(16, dtype=np.int32)
    state, _ = step(state, batch)
    np.testing.assert_array_equal(np.asarray(state["queue_index"]),
                                  np.r_[np.arange(16), np.full(16, -1)])
    # The same images again: every query now has its own older key in the queue, excluded.
    batch["view2"] = batch["view1"]
    _, m = step(state, batch)
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["negative_cos"]))


@pytest.mark.parametrize("centred", [False, True])
def test_margin_free_metrics_by_hand(centred):
    """loss_nomargin / contrast_acc_nomargin recomputed from the step's own queries and keys;
    with moco.center_embeddings the head's outputs lose their batch mean before the L2
    normalisation (queries and keys each over their own batch), and the queue gets those keys."""
    config = tiny_config(center_embeddings=centred)
    center = (lambda z: z - jnp.mean(z, axis=0, keepdims=True)) if centred else (lambda z: z)
    model, _, step, init = make_parts(config, 4)
    state = jax.jit(init)(jax.random.PRNGKey(0))
    batch = random_batches(config, 1)[0]
    new_state, m = jax.jit(step)(state, batch)
    mom = config.moco.momentum
    key_params = jax.tree.map(lambda k, q: mom * k + (1 - mom) * q, state["key_params"],
                              state["params"])
    perm = jax.random.permutation(jax.random.fold_in(state["rng"], 0), config.batch_size)
    out_k, _ = model.apply({"params": key_params, "batch_stats": state["key_batch_stats"]},
                           jnp.asarray(batch["view2"])[perm], train=True, mutable=["batch_stats"])
    keys = np.asarray(objectives.l2_normalize(center(out_k["projection"])))[np.argsort(perm)]
    out_q, _ = model.apply({"params": state["params"], "batch_stats": state["batch_stats"]},
                           jnp.asarray(batch["view1"]), train=True, mutable=["batch_stats"])
    queries = np.asarray(objectives.l2_normalize(center(out_q["projection"])), np.float64)
    pos = (queries * keys).sum(-1)
    neg = queries @ np.asarray(state["queue"], np.float64).T
    logits = np.concatenate([pos[:, None], neg], -1) / config.moco.temperature
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    np.testing.assert_allclose(float(m["loss_nomargin"]), np.mean(lse - logits[:, 0]), rtol=1e-4)
    np.testing.assert_allclose(float(m["contrast_acc_nomargin"]),
                               100 * np.mean(pos > neg.max(-1)), atol=1e-4)
    assert float(m["loss_nomargin"]) < float(m["loss"])  # The margin only handicaps.
    np.testing.assert_allclose(np.asarray(new_state["queue"])[:config.batch_size], keys,
                               atol=1e-5)
