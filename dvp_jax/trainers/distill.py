"""Phase 2: self-distillation while finetuning (trainer 'distill'). See docs/METHOD.md.

The student (same architecture as the teacher, initialised from the Phase-1 checkpoint or at
random, with a new classifier) minimises

    CE(student logits, labels; label smoothing) + lambda(step) * d(student, teacher)

with lambda(step) = config.distill.weight once ``step >= start_epochs * steps_per_epoch``, else 0.
d (config.distill.kind):
  'l2'   the paper's text: squared L2 distance of the pooled backbone features [B, C], summed
         over C, mean over B (objectives.l2_feature_distance); lambda = 1e-4.
  'l2_relative'  the same distance divided per example by the teacher feature's squared norm,
         ||s - t||^2 / ||t||^2 (objectives.relative_l2_feature_distance): scale-free, so
         lambda carries over between feature widths and data sets.
  'ofd'  the released code (Heo et al.'s OFD): the pre-ReLU outputs of the 4 stages; on the
         student side a trainable 1x1 conv (no bias) + BN "connector" per stage; per-channel
         margins from the teacher's last BN of each stage (objectives.ofd_margin, computed once
         at init); partial L2 with stage weights 1/8, 1/4, 1/2, 1, / batch / 1e4
         (objectives.ofd_loss); lambda = 1, off for the first distill.start_epochs epochs
         (with distill.epochs_from_one, as the released code: on after 4 epochs, lr drops
         after 29/59/89 epochs instead of 30/60/90).

The teacher (a Phase-1 checkpoint, head dropped, via dvp_jax/pretrained.py) is a frozen param
tree in the state: outside the optimizer, never differentiated (stop_gradient), BN in inference
mode. ``distill.teacher_bn='train'`` mimics the reference code, which leaves the teacher in
train mode: its BN normalises with the statistics of the current batch, and the running
statistics it would compute are DISCARDED (the teacher never changes).

State = the classification state of trainers/classify.py plus:
    teacher                {'params', 'batch_stats'} of the frozen teacher (bitwise constant)
    connector_params       OFD only: {'conv{s}': {'kernel' [1,1,C_s,C_t]}, 'bn{s}': {'scale','bias' [C_t]}}
    connector_batch_stats  OFD only: {'bn{s}': {'mean', 'var' [C_t]}}
    ofd_margins            OFD only: {'stage{s}': float32 [C_t]} (constant)
and opt_state over {'params': student params, 'connector_params': ...} (the same SGD).

The step is classify.make_train_step with an ExtraTerm: with lambda = 0 it is the finetune step.
Checkpoint meta records the teacher (directory, step, fingerprint); resuming a workdir with a
different teacher is refused.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dvp_jax import choices, config_checks, loop, models, objectives, pretrained, sharding
from dvp_jax.models.layers import BatchNorm, conv
from dvp_jax.models.spec import ModelSpec
from dvp_jax.trainers import classify, common

STAGES = ("stage1", "stage2", "stage3", "stage4")


class Connectors(nn.Module):
    """OFD's student-side connectors: per stage a 1x1 conv (no bias, kaiming fan-out init,
    as OFD's ``build_feature_connector``) then BN (gamma 1, beta 0, torch momentum 0.1).

    stages: 4 arrays [B, h_s, w_s, C_s] -> 4 float arrays [B, h_s, w_s, channels[s]].
    """
    channels: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, stages, train: bool = False):
        outs = []
        for i, (x, c) in enumerate(zip(stages, self.channels)):
            y = conv(c, 1, 1, dtype=self.dtype, name=f"conv{i + 1}")(x)
            outs.append(BatchNorm(use_running_average=not train, dtype=self.dtype,
                                  name=f"bn{i + 1}")(y))
        return outs


def load_teacher(config) -> pretrained.Pretrained:
    """The frozen teacher: config.distill.teacher_checkpoint, projection head and classifier dropped."""
    dc = config.distill
    if not dc.teacher_checkpoint:
        raise ValueError(
            "config.distill.teacher_checkpoint is empty: pass the 'checkpoints' folder of a "
            "Phase-1 run (e.g. --config.distill.teacher_checkpoint=runs/moco_digits/checkpoints) "
            "or a directory written by `python -m dvp_jax.convert_torch`.")
    step = dc.teacher_step if dc.teacher_step >= 0 else None
    return pretrained.load(dc.teacher_checkpoint, keep_projection=False, step=step)


def ofd_margins(teacher: pretrained.Pretrained) -> dict:
    """{'stage{s}': float32 [C_s]}: objectives.ofd_margin of the teacher's last BN of each stage."""
    bns = models.last_bn_of_stages(teacher.variables, teacher.spec.name)
    return {name: np.asarray(objectives.ofd_margin(jnp.asarray(bn["scale"]), jnp.asarray(bn["bias"])))
            for name, bn in zip(STAGES, bns)}


def make_distill_term(teacher_model, dc, *, start_step: int, connectors: Connectors | None = None,
                      teacher: pretrained.Pretrained | None = None,
                      student_stage_shapes: dict | None = None,
                      student_from_teacher: bool = False) -> classify.ExtraTerm:
    """The distillation ExtraTerm of config.distill ``dc`` (kind, weight, teacher_bn).

    teacher: whose variables (and, for OFD, margins) init() puts in the state (None: init()
    must not be called, e.g. in tests that build the state themselves).
    student_stage_shapes: {'stage{s}': ShapeDtypeStruct} to initialise the OFD connectors.
    student_from_teacher: the student's backbone was initialised from this teacher, so init()
    copies it from the state instead of embedding the teacher's arrays a second time in the
    jitted init program.
    """
    kind, weight, teacher_bn = dc.kind, float(dc.weight), dc.teacher_bn
    if kind not in choices.DISTILL_KINDS:
        raise ValueError(f"config.distill.kind={kind!r}; allowed: "
                         f"{', '.join(choices.DISTILL_KINDS)}.")
    if teacher_bn not in choices.DISTILL_TEACHER_BN:
        raise ValueError(f"config.distill.teacher_bn={teacher_bn!r}; allowed: "
                         f"{', '.join(choices.DISTILL_TEACHER_BN)}.")
    ofd = kind == "ofd"
    # Host numpy, computed once here (not inside the jitted init).
    margins = ofd_margins(teacher) if ofd and teacher is not None else None

    def init(rng, state):
        if student_from_teacher:
            frozen = {"params": {"backbone": state["params"]["backbone"]},
                      "batch_stats": {"backbone": state["batch_stats"]["backbone"]}}
            pretrained.check_same_shapes(frozen, teacher.variables, "teacher")
        else:
            frozen = jax.tree.map(jnp.asarray, {"params": teacher.variables["params"],
                                                "batch_stats": teacher.variables["batch_stats"]})
        state = dict(state, teacher=frozen)
        if ofd:
            dummy = [jnp.zeros(student_stage_shapes[s].shape, student_stage_shapes[s].dtype)
                     for s in STAGES]
            variables = connectors.init(rng, dummy, train=False)
            state.update(connector_params=variables["params"],
                         connector_batch_stats=variables["batch_stats"],
                         ofd_margins=jax.tree.map(jnp.asarray, margins))
        return state

    def prepare(state, batch):
        variables = state["teacher"]
        if teacher_bn == "eval":
            out = teacher_model.apply(variables, batch["image"], train=False)
        else:  # The reference code's teacher: batch statistics; running stats thrown away.
            out, _ = teacher_model.apply(variables, batch["image"], train=True,
                                         mutable=["batch_stats"])
        keep = STAGES if ofd else ("pooled",)
        return jax.lax.stop_gradient({k: out[k] for k in keep})

    def loss(trainable, state, out, context):
        if ofd:
            student, new_vars = connectors.apply(
                {"params": trainable["connector_params"],
                 "batch_stats": state["connector_batch_stats"]},
                [out[s] for s in STAGES], train=True, mutable=["batch_stats"])
            d = objectives.ofd_loss(student, [context[s] for s in STAGES],
                                    [state["ofd_margins"][s] for s in STAGES])
            updates = {"connector_batch_stats": new_vars["batch_stats"]}
        else:
            distance = (objectives.relative_l2_feature_distance if kind == "l2_relative"
                        else objectives.l2_feature_distance)
            d = distance(out["pooled"], context["pooled"])
            updates = {}
        lam = jnp.where(state["step"] >= start_step, weight, 0.0).astype(jnp.float32)
        return lam * d, updates, {"distill": d, "distill_weight": lam}

    return classify.ExtraTerm(trainable_keys=("connector_params",) if ofd else (),
                              init=init, prepare=prepare, loss=loss)


def distill_start_epoch(dc) -> float:
    """Epochs trained before distillation starts: start_epochs, or start_epochs - 1 when
    ``distill.epochs_from_one`` (the released code numbers epochs 1, 2, ... and distils from
    epoch number start_epochs, i.e. after start_epochs - 1 epochs)."""
    shift = 1.0 if dc.get("epochs_from_one", False) else 0.0
    return max(0.0, float(dc.start_epochs) - shift)


def phase2_optim_config(config):
    """config.optim, with each 'step' decay epoch one earlier when ``distill.epochs_from_one``
    (the released code's ``lr * 0.1 ** (epoch // 30)`` with epochs from 1: drops after 29, 59,
    89 epochs)."""
    if not config.distill.get("epochs_from_one", False) or config.optim.schedule != "step":
        return config.optim
    oc = config.optim.copy_and_resolve_references()
    with oc.unlocked():
        oc.decay_epochs = tuple(max(0.0, float(e) - 1.0) for e in config.optim.decay_epochs)
    return oc


def check_teacher(model, config, teacher: pretrained.Pretrained) -> None:
    """The teacher must have the student's backbone (same architecture and width)."""
    classify.check_backbone(model, config, teacher, "config.distill.teacher_checkpoint")


def build_task(config, mesh, workdir: str | None = None) -> loop.Task:
    """The loop.Task of a Phase-2 run (see configs/distill.py)."""
    config_checks.validate(config)
    dc = config.distill
    sizes = common.data_sizes(config, mesh)
    spec = ModelSpec.from_config(config.model, num_classes=sizes.num_classes)
    model = spec.build()
    teacher = load_teacher(config)
    check_teacher(model, config, teacher)
    teacher_model = teacher.spec.replace(dtype=str(config.model.dtype)).build()
    schedule, tx = common.make_optimizer(config, sizes, optim_config=phase2_optim_config(config))

    connectors, stage_shapes = None, None
    if dc.kind == "ofd":
        out_shapes = jax.eval_shape(
            lambda r: model.init_with_output(r, common.dummy_images(config), train=False)[0],
            jax.random.PRNGKey(0))
        stage_shapes = {s: out_shapes[s] for s in STAGES}
        channels = tuple(int(np.shape(m)[0]) for m in ofd_margins(teacher).values())
        connectors = Connectors(channels, dtype=jnp.dtype(config.model.dtype))
    start_step = int(round(distill_start_epoch(dc) * sizes.steps_per_epoch))
    term = make_distill_term(teacher_model, dc, start_step=start_step, connectors=connectors,
                             teacher=teacher, student_stage_shapes=stage_shapes,
                             student_from_teacher=dc.student_init == "teacher")
    train_step = classify.make_train_step(model, tx, label_smoothing=config.classify.label_smoothing,
                                          extra=term,
                                          mixup_alpha=config.classify.get("mixup_alpha", 0.0))
    init_state = classify.make_init_state(
        model, tx, config, init=teacher if dc.student_init == "teacher" else None, extra=term,
        what="config.distill.teacher_checkpoint")
    return loop.Task(
        name="distill", init_state=init_state,
        train_step=classify.device_step(common.with_lr(train_step, schedule), config, mesh),
        train_batches=common.train_batches_fn(config, classify.TRAIN_TRANSFORM),
        total_steps=sizes.total_steps, steps_per_epoch=sizes.steps_per_epoch,
        images_per_step=config.batch_size,
        meta={"trainer": "distill", "model": spec.to_meta(), "teacher": teacher.describe(),
              "distill": {"kind": dc.kind, "weight": float(dc.weight),
                          "teacher_bn": dc.teacher_bn, "student_init": dc.student_init}},
        evaluators=[classify.accuracy_evaluator(config, model, mesh, workdir=workdir,
                                                trainer="distill",
                                                steps_per_epoch=sizes.steps_per_epoch)],
        eval_every_steps=common.eval_every_steps(config, sizes.steps_per_epoch),
        check_resume=pretrained.check_same_teacher(
            teacher, "config.distill.teacher_checkpoint"))


def train(config, workdir: str, mesh=None) -> Any:
    """Runs Phase 2 in ``workdir``; returns the final state."""
    mesh = sharding.make_mesh() if mesh is None else mesh
    return loop.run(build_task(config, mesh, workdir), config, workdir, mesh)
