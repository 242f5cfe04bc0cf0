"""Phase 1: MoCo v2 with a margin (the teacher). Formulas: docs/METHOD.md.

State (a plain dict pytree, replicated over the mesh):
    step        int32 []          steps taken
    params      query encoder (backbone + MLP head), fp32
    batch_stats query encoder BN running statistics
    key_params  momentum encoder: EMA of params (m = config.moco.momentum)
    key_batch_stats  its own BN statistics (never averaged)
    opt_state   SGD momentum buffers (query encoder only)
    queue       float32 [K, D] unit rows; queue_ptr int32 [] next row to overwrite
    queue_index int32 [K] train-split index of the image of each queue row (-1: none yet)
    rng         PRNG key [2] (uint32); per-step keys are fold_in(rng, step)

One step, in MoCo's order: momentum update of the key encoder; keys of view2 (shuffle BN);
queries of view1; margin InfoNCE against [k+, queue]; SGD; the global batch's keys replace
the oldest queue rows (ring buffer). With moco.center_embeddings the head's outputs (queries,
keys) lose their batch mean before the L2 normalisation (a BN without scale at the end of the
head, as in SimCLR's / MoCo v3's projection heads; configs/moco.py:digits says why).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging

from dvp_jax import config_checks, loop, objectives, optim, sharding
from dvp_jax.models.spec import ModelSpec
from dvp_jax.trainers import common


SINGLE_SHARD_BN_GROUPS = 8  # MoCo's single-GPU recipe (its CIFAR demo): 8 BN groups.
MIN_IMAGES_PER_BN_GROUP = 4  # Fewer images per group make the BN statistics mostly noise.


def bn_groups(config, mesh) -> int:
    """BN groups of both encoders (a divisor of the global batch).

    'sync' -> 1. 'split' / 'none': ``moco.bn_groups`` if > 0; else (auto) one group per data
    shard on several shards, and on a single shard MoCo's single-GPU recipe: 8 groups, or the
    largest g < 8 dividing the batch with >= MIN_IMAGES_PER_BN_GROUP images per group (logged).
    """
    if config.moco.shuffle_bn == "sync":
        return 1
    if config.moco.bn_groups:
        return int(config.moco.bn_groups)
    shards = sharding.num_data_shards(mesh)
    if shards > 1:
        return shards
    batch = int(config.batch_size)
    groups = next(g for g in range(SINGLE_SHARD_BN_GROUPS, 0, -1)
                  if batch % g == 0 and (batch // g >= MIN_IMAGES_PER_BN_GROUP or g == 1))
    if groups == SINGLE_SHARD_BN_GROUPS:
        logging.info("Shuffle BN on one data shard: %d BN groups of %d images (MoCo's "
                     "single-GPU recipe; set moco.bn_groups to change).", groups, batch // groups)
    else:
        logging.warning("Shuffle BN on one data shard: batch %d allows only %d BN group(s) of >= "
                        "%d images instead of MoCo's %d.", batch, groups, MIN_IMAGES_PER_BN_GROUP,
                        SINGLE_SHARD_BN_GROUPS)
    return groups


def projection_dims(config) -> tuple[int, ...]:
    """``moco.projection_dims`` with 0 entries replaced by the backbone's feature width C
    (the reference head: Linear(C, C) -> ReLU -> Linear(C, 128))."""
    dims = tuple(int(d) for d in config.moco.projection_dims)
    if any(d <= 0 for d in dims):
        width = common.feature_width(config)
        dims = tuple(d if d > 0 else width for d in dims)
    return dims


def margin_at(moco_config, step, steps_per_epoch: int):
    """The margin at ``step``: moco.margin, ramped linearly from 0 over margin_warmup_epochs."""
    warmup = float(moco_config.get("margin_warmup_epochs", 0.0)) * steps_per_epoch
    if warmup <= 0:
        return jnp.asarray(moco_config.margin, jnp.float32)
    return moco_config.margin * jnp.minimum(step.astype(jnp.float32) / warmup, 1.0)


def check_queue(queue_size: int, global_batch: int) -> None:
    """The ring buffer advances by whole global batches: K must be a multiple of it."""
    common.check_queue("moco.queue_size", queue_size, global_batch)


def make_train_step(model, tx: optax.GradientTransformation, moco_config, *, total_steps: int,
                    shuffle: bool, steps_per_epoch: int = 1):
    """The pure step (state, batch) -> (state, metrics); batch has 'view1', 'view2' [B,S,S,3].

    Metrics: 'loss'; 'loss_nomargin' (the InfoNCE of the same logits without the margin: it
    stays comparable while the margin warms up); 'contrast_acc' (% of queries whose positive
    logit, margin applied, beats every queue key); 'contrast_acc_nomargin' (the same without
    the margin: the pretext task's accuracy); 'positive_cos' / 'negative_cos' (mean q.k+ /
    q.queue over the counted negatives); 'margin' (after warm-up).
    """
    temperature = moco_config.temperature
    exclude_own = bool(moco_config.get("exclude_own_keys", False))
    centered = bool(moco_config.get("center_embeddings", False))

    def center(z):
        """moco.center_embeddings: the head's outputs minus their mean over the global batch
        (before the L2 normalisation; queries and keys each over their own batch)."""
        return z - jnp.mean(z, axis=0, keepdims=True) if centered else z

    def momentum_at(step):
        if moco_config.momentum_cosine:
            return optim.cosine_momentum(moco_config.momentum, step, total_steps)
        return jnp.asarray(moco_config.momentum, jnp.float32)

    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        step = state["step"]
        rng = jax.random.fold_in(state["rng"], step)
        m = momentum_at(step)
        margin = margin_at(moco_config, step, steps_per_epoch)
        key_params = jax.tree.map(lambda k, q: m * k + (1.0 - m) * q,
                                  state["key_params"], state["params"])

        views_k = batch["view2"]
        if shuffle:  # Shuffle BN: BN groups never see a query beside its own key.
            perm = jax.random.permutation(rng, views_k.shape[0])
            views_k = views_k[perm]
        out_k, key_vars = model.apply({"params": key_params, "batch_stats": state["key_batch_stats"]},
                                      views_k, train=True, mutable=["batch_stats"])
        keys = objectives.l2_normalize(center(out_k["projection"]))
        if shuffle:
            keys = keys[jnp.argsort(perm)]
        keys = jax.lax.stop_gradient(keys)

        index = batch["index"] if "index" in batch else jnp.full(keys.shape[:1], -1, jnp.int32)
        own = None
        if exclude_own:  # Older keys of the query's own image are not negatives.
            own = (state["queue_index"][None, :] == index[:, None]) & (index[:, None] >= 0)

        def loss_fn(params):
            out_q, q_vars = model.apply({"params": params, "batch_stats": state["batch_stats"]},
                                        batch["view1"], train=True, mutable=["batch_stats"])
            queries = objectives.l2_normalize(center(out_q["projection"]))
            loss, logits = objectives.margin_info_nce(queries, keys, state["queue"], margin=margin,
                                                      temperature=temperature, exclude=own)
            return loss, (q_vars["batch_stats"], logits)

        (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)

        queue, queue_ptr = common.enqueue(state["queue"], state["queue_ptr"], keys)
        queue_index, _ = common.enqueue(state["queue_index"], state["queue_ptr"], index)
        new_state = dict(state, step=step + 1, params=params, batch_stats=batch_stats,
                         key_params=key_params, key_batch_stats=key_vars["batch_stats"],
                         opt_state=opt_state, queue=queue, queue_index=queue_index,
                         queue_ptr=queue_ptr)
        positive = logits[:, 0] * temperature + margin  # q.k+ without the margin.
        q_dot_queue = logits[:, 1:] * temperature
        counted = jnp.ones_like(q_dot_queue, bool) if own is None else ~own
        negatives = jnp.where(counted, q_dot_queue, -2.0)  # Excluded entries never win.
        plain = jnp.concatenate([positive[:, None] / temperature, jnp.where(
            counted, q_dot_queue / temperature, objectives.MASKED_LOGIT)], axis=-1)
        metrics = {
            "loss": loss,
            "loss_nomargin": jnp.mean(-jax.nn.log_softmax(plain, axis=-1)[:, 0]),
            "contrast_acc": 100.0 * jnp.mean(jnp.argmax(logits, -1) == 0),
            "contrast_acc_nomargin": 100.0 * jnp.mean(positive > jnp.max(negatives, axis=-1)),
            "positive_cos": jnp.mean(positive),
            "negative_cos": jnp.sum(jnp.where(counted, q_dot_queue, 0.0)) / jnp.maximum(
                jnp.sum(counted), 1),
            "margin": margin,
            "grad_norm": optim.global_norm(grads),
            "momentum": m,
        }
        return new_state, metrics

    return train_step


def make_init_state(model, tx, config, groups: int):
    """rng -> the initial state (query and key encoders equal; queue of random unit rows)."""
    dim = projection_dims(config)[-1]

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
                    queue_index=jnp.full((config.moco.queue_size,), -1, jnp.int32),
                    queue_ptr=jnp.zeros((), jnp.int32), rng=state_rng)

    return init_state


def build_task(config, mesh) -> loop.Task:
    """The loop.Task of a Phase-1 run described by ``config`` (see configs/moco.py)."""
    from dvp_jax.input import device_augment
    config_checks.validate(config)
    sizes = common.data_sizes(config, mesh)
    check_queue(config.moco.queue_size, config.batch_size)
    groups = bn_groups(config, mesh)
    common.check_bn_groups(config, groups, "moco.bn_groups")
    spec = ModelSpec.from_config(config.model, projection_dims=projection_dims(config),
                                 bn_groups=groups)
    model = spec.build()
    schedule, tx = common.make_optimizer(config, sizes)
    train_step = make_train_step(model, tx, config.moco, total_steps=sizes.total_steps,
                                 shuffle=config.moco.shuffle_bn == "split",
                                 steps_per_epoch=sizes.steps_per_epoch)

    eval_spec = spec.replace(bn_groups=1)  # Evaluation and checkpoints: plain BN.
    eval_model = eval_spec.build()
    evaluators = []
    if config.knn.enabled:
        evaluators.append(common.knn_evaluator(config, eval_model, common.encoder_variables, mesh,
                                               feature=config.knn.feature))
    return loop.Task(
        name="moco", init_state=make_init_state(model, tx, config, groups),
        train_step=device_augment.wrap_step(common.with_lr(train_step, schedule), config, mesh,
                                            "moco_v2"),
        train_batches=common.train_batches_fn(config, "moco_v2"),
        total_steps=sizes.total_steps, steps_per_epoch=sizes.steps_per_epoch,
        images_per_step=config.batch_size,
        meta={"trainer": "moco", "model": eval_spec.to_meta()},
        evaluators=evaluators, eval_every_steps=common.eval_every_steps(config, sizes.steps_per_epoch))


def train(config, workdir: str, mesh=None) -> Any:
    """Runs Phase 1 in ``workdir``; returns the final state."""
    mesh = sharding.make_mesh() if mesh is None else mesh
    return loop.run(build_task(config, mesh), config, workdir, mesh)
