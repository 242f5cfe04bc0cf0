"""Phase 1: MoCo v2 with a margin (the teacher). Formulas: docs/METHOD.md.

State (a plain dict pytree, replicated over the mesh):
    step        int32 []          steps taken
    params      query encoder (backbone + MLP head), fp32
    batch_stats query encoder BN running statistics
    key_params  momentum encoder: EMA of params (m = config.moco.momentum)
    key_batch_stats  its own BN statistics (never averaged)
    opt_state   SGD momentum buffers (query encoder only)
    queue       float32 [K, D] unit rows; queue_ptr int32 [] next row to overwrite
    rng         PRNG key [2] (uint32); per-step keys are fold_in(rng, step)

One step, in MoCo's order: momentum update of the key encoder; keys of view2 (shuffle BN);
queries of view1; margin InfoNCE against [k+, queue]; SGD; the global batch's keys replace
the oldest queue rows (ring buffer).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from dvp_jax import config_checks, loop, objectives, optim, sharding
from dvp_jax.trainers import common

SHUFFLE_BN_MODES = ("split", "sync", "none")


def bn_groups(config, mesh) -> int:
    """BN groups of both encoders: 'split'/'none' -> moco.bn_groups (0 = data shards); 'sync' -> 1."""
    if config.moco.shuffle_bn == "sync":
        return 1
    return config.moco.bn_groups or sharding.num_data_shards(mesh)


def check_queue(queue_size: int, global_batch: int) -> None:
    """The ring buffer advances by whole global batches: K must be a multiple of it."""
    config_checks.check_multiple("moco.queue_size", queue_size, "batch_size", global_batch,
                                 "the queue is written a whole global batch at a time")


def make_train_step(model, tx: optax.GradientTransformation, moco_config, *, total_steps: int,
                    shuffle: bool):
    """The pure step (state, batch) -> (state, metrics); batch has 'view1', 'view2' [B,S,S,3]."""
    margin, temperature = moco_config.margin, moco_config.temperature

    def momentum_at(step):
        if moco_config.momentum_cosine:
            return optim.cosine_momentum(moco_config.momentum, step, total_steps)
        return jnp.asarray(moco_config.momentum, jnp.float32)

    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        step = state["step"]
        rng = jax.random.fold_in(state["rng"], step)
        m = momentum_at(step)
        key_params = jax.tree.map(lambda k, q: m * k + (1.0 - m) * q,
                                  state["key_params"], state["params"])

        views_k = batch["view2"]
        if shuffle:  # Shuffle BN: BN groups never see a query beside its own key.
            perm = jax.random.permutation(rng, views_k.shape[0])
            views_k = views_k[perm]
        out_k, key_vars = model.apply({"params": key_params, "batch_stats": state["key_batch_stats"]},
                                      views_k, train=True, mutable=["batch_stats"])
        keys = objectives.l2_normalize(out_k["projection"])
        if shuffle:
            keys = keys[jnp.argsort(perm)]
        keys = jax.lax.stop_gradient(keys)

        def loss_fn(params):
            out_q, q_vars = model.apply({"params": params, "batch_stats": state["batch_stats"]},
                                        batch["view1"], train=True, mutable=["batch_stats"])
            queries = objectives.l2_normalize(out_q["projection"])
            loss, logits = objectives.margin_info_nce(queries, keys, state["queue"], margin=margin,
                                                      temperature=temperature)
            return loss, (q_vars["batch_stats"], logits)

        (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)

        queue_size, batch_size = state["queue"].shape[0], keys.shape[0]
        queue = jax.lax.dynamic_update_slice(state["queue"], keys, (state["queue_ptr"], 0))
        new_state = dict(state, step=step + 1, params=params, batch_stats=batch_stats,
                         key_params=key_params, key_batch_stats=key_vars["batch_stats"],
                         opt_state=opt_state, queue=queue,
                         queue_ptr=(state["queue_ptr"] + batch_size) % queue_size)
        metrics = {
            "loss": loss,
            "contrast_acc": 100.0 * jnp.mean(jnp.argmax(logits, -1) == 0),
            "positive_cos": jnp.mean(logits[:, 0]) * temperature + margin,  # mean q.k+
            "grad_norm": optim.global_norm(grads),
            "momentum": m,
        }
        return new_state, metrics

    return train_step


def make_init_state(model, tx, config, groups: int):
    """rng -> the initial state (query and key encoders equal; queue of random unit rows)."""
    dim = config.moco.projection_dims[-1]

    def init_state(rng: jax.Array) -> dict:
        init_rng, queue_rng, state_rng = jax.random.split(rng, 3)
        variables = model.init(init_rng, common.dummy_images(config, groups), train=False)
        params = variables["params"]
        queue = objectives.l2_normalize(
            jax.random.normal(queue_rng, (config.moco.queue_size, dim), jnp.float32))
        return dict(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables["batch_stats"],
                    key_params=jax.tree.map(jnp.copy, params),
                    key_batch_stats=jax.tree.map(jnp.copy, variables["batch_stats"]),
                    opt_state=tx.init(params), queue=queue,
                    queue_ptr=jnp.zeros((), jnp.int32), rng=state_rng)

    return init_state


def build_task(config, mesh) -> loop.Task:
    """The loop.Task of a Phase-1 run described by ``config`` (see configs/moco.py)."""
    from dvp_jax.input import device_augment, pipeline
    if config.moco.shuffle_bn not in SHUFFLE_BN_MODES:
        raise config_checks.ConfigError(f"config.moco.shuffle_bn={config.moco.shuffle_bn!r}; allowed: "
                         f"{', '.join(SHUFFLE_BN_MODES)}.")
    sizes = common.data_sizes(config, mesh)
    check_queue(config.moco.queue_size, config.batch_size)
    groups = bn_groups(config, mesh)
    if config.batch_size % groups:
        raise config_checks.ConfigError(f"config.batch_size={config.batch_size} is not divisible by the "
                         f"{groups} BN groups (config.moco.bn_groups).")
    kwargs = common.model_kwargs(config.model, projection_dims=list(config.moco.projection_dims),
                                 bn_groups=groups)
    model = common.build_model(kwargs)
    schedule = optim.make_schedule(config.optim, global_batch=config.batch_size,
                                   steps_per_epoch=sizes.steps_per_epoch,
                                   num_epochs=config.num_epochs)
    tx = optim.make_optimizer(config.optim, schedule)
    train_step = make_train_step(model, tx, config.moco, total_steps=sizes.total_steps,
                                 shuffle=config.moco.shuffle_bn == "split")

    def train_step_with_lr(state, batch):
        new_state, metrics = train_step(state, batch)
        return new_state, dict(metrics, lr=schedule(state["step"]))

    def train_batches(start_step: int):
        return pipeline.make_train_iterator(
            config.input, config.input.train_split, "moco_v2", global_batch=config.batch_size,
            seed=config.seed, start_step=start_step, image_size=config.input.image_size)

    eval_model = common.build_model(dict(kwargs, bn_groups=1))
    evaluators = []
    if config.knn.enabled:
        evaluators.append(common.knn_evaluator(config, eval_model, common.encoder_variables, mesh,
                                               feature=config.knn.feature))
    return loop.Task(
        name="moco", init_state=make_init_state(model, tx, config, groups),
        train_step=device_augment.wrap_step(train_step_with_lr, config, mesh, "moco_v2"),
        train_batches=train_batches,
        total_steps=sizes.total_steps, steps_per_epoch=sizes.steps_per_epoch,
        images_per_step=config.batch_size,
        meta={"trainer": "moco", "model": dict(kwargs, bn_groups=1)},
        evaluators=evaluators, eval_every_steps=common.eval_every_steps(config, sizes.steps_per_epoch))


def train(config, workdir: str, mesh=None) -> Any:
    """Runs Phase 1 in ``workdir``; returns the final state."""
    mesh = sharding.make_mesh() if mesh is None else mesh
    return loop.run(build_task(config, mesh), config, workdir, mesh)
