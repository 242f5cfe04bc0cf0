"""SEED: self-supervised distillation into a smaller student (Fang et al., ICLR 2021).

Formulas and defaults: docs/METHOD.md (SEED); presets and paper-vs-code notes:
configs/seed_distill.py.

State (a plain dict pytree, replicated over the mesh):
    step        int32 []          steps taken
    params      student {'backbone', 'projection'} (MLP head Dense(d) -> ReLU -> Dense(D)), fp32
    batch_stats student BN running statistics {'backbone'}
    opt_state   SGD momentum buffers (student params only)
    teacher     {'params', 'batch_stats'} of the frozen teacher (backbone + projection head):
                outside the optimizer, passed through each step unchanged
    queue       float32 [K, D] teacher embeddings (unit rows); queue_ptr int32 [] next row
    rng         PRNG key [2] (uint32); unused by the step (kept for the state convention)

One step: t = normalise(teacher(x)) with inference-mode BN and stop_gradient; s =
normalise(student(x)) on the SAME view x [B, S, S, 3]; loss = objectives.seed_loss(s, t, queue,
tau_S, tau_T) over D+ = {t} + queue; SGD on the student; the global batch's t replace the
oldest queue rows (ring buffer, pointer advances by the global batch).

The student checkpoint is directly usable as ``config.classify.init_checkpoint``: its state
has top-level 'params' / 'batch_stats' of the student and meta['model'] its build kwargs;
meta['teacher'] is the teacher's ``Pretrained.describe()`` (directory, step, fingerprint).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dvp_jax import (checkpoints, choices, config_checks, loop, objectives, optim, pretrained,
                     sharding)
from dvp_jax.models.spec import ModelSpec
from dvp_jax.trainers import common


def check_queue(queue_size: int, global_batch: int) -> None:
    """The ring buffer advances by whole global batches: K must be a multiple of it."""
    common.check_queue("seed_distill.queue_size", queue_size, global_batch)


def load_teacher(seed_config) -> pretrained.Pretrained:
    """The frozen teacher (with its projection head) named by ``config.seed_distill``."""
    if not seed_config.teacher_checkpoint:
        raise config_checks.ConfigError(
            "config.seed_distill.teacher_checkpoint is empty: pass the 'checkpoints' folder of a "
            "Phase-1 run (e.g. --config.seed_distill.teacher_checkpoint=runs/moco_digits/"
            "checkpoints) or of a converted SSL encoder.")
    step = None if seed_config.teacher_step < 0 else int(seed_config.teacher_step)
    teacher = pretrained.load(seed_config.teacher_checkpoint, keep_projection=True, step=step)
    if "projection" not in teacher.variables["params"] or not teacher.spec.projection_dims:
        raise checkpoints.CheckpointError(
            f"The teacher checkpoint {seed_config.teacher_checkpoint!r} has no projection head; "
            "SEED distils the teacher's normalised projection (e.g. MoCo's 128-d output).")
    return teacher


def teacher_spec(teacher: pretrained.Pretrained, dtype: str) -> ModelSpec:
    """The teacher's model (one BN group, no classifier) computing in ``dtype``."""
    return teacher.spec.replace(bn_groups=1, num_classes=0, dtype=str(dtype))


def student_spec(config, embedding_dim: int, groups: int) -> ModelSpec:
    """The student: config.model + head (hidden, embedding_dim); hidden 0 = backbone C."""
    hidden = int(config.seed_distill.hidden_dim)
    if hidden <= 0:
        hidden = common.feature_width(config)
    return ModelSpec.from_config(config.model, projection_dims=(hidden, int(embedding_dim)),
                                 bn_groups=groups)


def make_train_step(student, teacher, tx: optax.GradientTransformation, seed_config,
                    view_key: str = "view1"):
    """The pure step (state, batch) -> (state, metrics); ``batch[view_key]`` is [B, S, S, 3]."""
    tau_s = float(seed_config.student_temperature)
    tau_t = float(seed_config.teacher_temperature)

    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        images = batch[view_key]
        frozen = jax.lax.stop_gradient(state["teacher"])
        t_out = teacher.apply(frozen, images, train=False)
        t = jax.lax.stop_gradient(objectives.l2_normalize(t_out["projection"]))
        queue = state["queue"]

        def loss_fn(params):
            # SEED's own students (model.variant='seed_distill') use dropout: one key per step.
            dropout_key = jax.random.fold_in(state["rng"], state["step"])
            out, new_vars = student.apply({"params": params, "batch_stats": state["batch_stats"]},
                                          images, train=True, mutable=["batch_stats"],
                                          rngs={"dropout": dropout_key})
            s = objectives.l2_normalize(out["projection"])
            loss = objectives.seed_loss(s, t, queue, student_temperature=tau_s,
                                        teacher_temperature=tau_t)
            return loss, (new_vars["batch_stats"], s)

        (loss, (batch_stats, s)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)

        new_queue, queue_ptr = common.enqueue(queue, state["queue_ptr"], t)
        new_state = dict(state, step=state["step"] + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state, queue=new_queue, queue_ptr=queue_ptr)
        s = jax.lax.stop_gradient(s)
        positive = jnp.sum(s * t, axis=-1)  # s.t [B]
        best_negative = jnp.max(s @ queue.T, axis=-1)  # max_j s.queue_j [B]
        metrics = {
            "loss": loss,
            "positive_cos": jnp.mean(positive),  # mean s.t
            # % of the batch whose student similarity ranks t first in D+ (the teacher's top).
            "match_acc": 100.0 * jnp.mean(positive > best_negative),
            "grad_norm": optim.global_norm(grads),
        }
        return new_state, metrics

    return train_step


def make_init_state(student, tx, config, teacher_variables: dict, groups: int,
                    embedding_dim: int):
    """rng -> initial state: fresh student, the teacher's variables, a queue [K, embedding_dim]
    of random unit rows.

    ``teacher_variables`` are host numpy arrays; under the loop's jit they become constants of
    the init program only (the train step receives them through the state).
    """
    dim = int(embedding_dim)
    host_teacher = jax.tree.map(np.asarray, teacher_variables)

    def init_state(rng: jax.Array) -> dict:
        init_rng, queue_rng, state_rng = jax.random.split(rng, 3)
        variables = student.init(init_rng, common.dummy_images(config, groups), train=False)
        queue = objectives.l2_normalize(
            jax.random.normal(queue_rng, (config.seed_distill.queue_size, dim), jnp.float32))
        return dict(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                    teacher=jax.tree.map(jnp.asarray, host_teacher), queue=queue,
                    queue_ptr=jnp.zeros((), jnp.int32), rng=state_rng)

    return init_state


def teacher_knn_evaluator(config, teacher_model, mesh):
    """state -> {'teacher_knn_top1': %}, computed at the first call and then repeated."""
    evaluate = common.knn_evaluator(config, teacher_model, lambda state: state["teacher"], mesh,
                                    feature=config.knn.feature, prefix="teacher_knn")
    cache: dict = {}

    def once(state) -> dict:
        if not cache:
            cache.update(evaluate(state))
        return dict(cache)

    return once


def build_task(config, mesh) -> loop.Task:
    """The loop.Task of a SEED run described by ``config`` (see configs/seed_distill.py)."""
    from dvp_jax.input import device_augment
    sc = config.seed_distill
    config_checks.validate(config)
    sizes = common.data_sizes(config, mesh)
    check_queue(sc.queue_size, config.batch_size)
    groups = int(sc.bn_groups) or sharding.num_data_shards(mesh)
    common.check_bn_groups(config, groups, "seed_distill.bn_groups")

    teacher = load_teacher(sc)
    t_spec = teacher_spec(teacher, config.model.dtype)
    teacher_model = t_spec.build()
    t_shapes = jax.eval_shape(lambda: teacher_model.init(
        jax.random.PRNGKey(0), common.dummy_images(config), train=False))
    pretrained.check_same_shapes(t_shapes["params"], teacher.variables["params"],
                                 "seed_distill.teacher_checkpoint")
    embedding_dim = t_spec.projection_dims[-1]

    spec = student_spec(config, embedding_dim, groups)
    student = spec.build()
    schedule, tx = common.make_optimizer(config, sizes)
    train_step = make_train_step(student, teacher_model, tx, sc,
                                 view_key=choices.SEED_DISTILL_AUGMENTATIONS[sc.augmentation])

    # Only the view both networks see (or, augmenting on the devices, what makes it).
    keep = (device_augment.DEVICE_INPUT_KEYS
            if device_augment.on_device(config.input, sc.augmentation)
            else (choices.SEED_DISTILL_AUGMENTATIONS[sc.augmentation],))

    eval_spec = spec.replace(bn_groups=1)  # Evaluation and checkpoints: plain BN.
    evaluators = []
    if config.knn.enabled:
        evaluators.append(common.knn_evaluator(config, eval_spec.build(),
                                               common.encoder_variables, mesh,
                                               feature=config.knn.feature))
        if config.knn.teacher:
            evaluators.append(teacher_knn_evaluator(config, teacher_model, mesh))
    return loop.Task(
        name="seed_distill",
        init_state=make_init_state(student, tx, config, teacher.variables, groups,
                                   embedding_dim),
        train_step=device_augment.wrap_step(common.with_lr(train_step, schedule), config, mesh,
                                            sc.augmentation),
        train_batches=common.train_batches_fn(config, sc.augmentation, keys=keep),
        total_steps=sizes.total_steps, steps_per_epoch=sizes.steps_per_epoch,
        images_per_step=config.batch_size,
        meta={"trainer": "seed_distill", "model": eval_spec.to_meta(), "teacher": teacher.describe()},
        evaluators=evaluators,
        eval_every_steps=common.eval_every_steps(config, sizes.steps_per_epoch),
        check_resume=pretrained.check_same_teacher(
            teacher, "config.seed_distill.teacher_checkpoint"))


def train(config, workdir: str, mesh=None) -> Any:
    """Runs SEED distillation in ``workdir``; returns the final state."""
    mesh = sharding.make_mesh() if mesh is None else mesh
    return loop.run(build_task(config, mesh), config, workdir, mesh)
