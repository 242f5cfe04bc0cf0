"""Classification trainers: 'supervised', 'linear', 'finetune' (config.trainer). See docs/METHOD.md.

  supervised  random init; Phase 2's recipe without a teacher (SGD Nesterov, lr 0.1 per 256,
              wd 1e-4, 100 epochs, x0.1 at 30/60/90, RandomResizedCrop(0.08..1) + flip, CE).
  finetune    the same recipe, backbone from a Phase-1 checkpoint (config.classify.init_checkpoint),
              a new classifier.
  linear      linear readout: the Phase-1 backbone frozen in INFERENCE mode (BN running
              statistics used, never updated), a new linear layer ~ N(0, linear_init_std) with
              bias 0, SGD lr 30 per 256, wd 0, x0.1 at 60% / 80% of training.

State (a plain dict pytree, replicated over the mesh):
    step         int32 []         steps taken
    params       {'backbone', 'classifier'} of the model (fp32)
    batch_stats  {'backbone'} BN running statistics (bitwise constant for 'linear')
    opt_state    SGD state of the TRAINABLE tree only: {'params': params} ('supervised',
                 'finetune', 'distill'), {'params': {'classifier'}} ('linear'), plus the
                 entries a trainer adds (Phase 2's OFD connectors: 'connector_params')
    rng          PRNG key [2] (uint32); step k draws from fold_in(rng, k) (mixup, dropout)

``make_train_step`` is the ONE classification step: Phase 2 (trainers/distill.py) passes an
``ExtraTerm`` (its distillation loss) and otherwise runs exactly this code, so with the term's
weight at 0 a distillation step equals a finetune step.

Evaluation: top-1 / top-5 of the logits on ``input.eval_split`` ('eval_center' transform)
every ``loop.eval_every_epochs`` and at the end; process 0 writes the latest result to
``WORKDIR/eval_<split>.json`` ({'top1', 'top5' (percent), 'split', 'step', ...}; at the end:
the "final" accuracy) and the best one so far to ``WORKDIR/best_<split>.json`` (the "best val
epoch (reference protocol)" the reference code reports).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from dvp_jax import (choices, config_checks, loop, models, objectives, optim, pretrained,
                     sharding)
from dvp_jax.evaluators import eval_files
from dvp_jax.evaluators.accuracy import EVAL_TRANSFORM, Accuracy, top_k
from dvp_jax.models.spec import ModelSpec
from dvp_jax.trainers import common

TRAIN_TRANSFORM = "train_crop_flip"


@dataclasses.dataclass(frozen=True)
class ExtraTerm:
    """A term added to the classification loss (Phase 2's distillation).

    trainable_keys: state entries differentiated and optimised beside 'params' (same optimizer).
    init: (rng, state) -> state with the term's entries added (before opt_state is built).
    prepare: (state, batch) -> context computed OUTSIDE the gradient (e.g. teacher features).
    loss: (trainable, state, student outputs, context) -> (weighted term [], state updates
        (dict of state entries, e.g. new connector BN statistics), metrics dict of scalars).
        ``trainable`` = {'params': ..., **{k: state[k] for k in trainable_keys}}.
    """
    trainable_keys: tuple[str, ...]
    init: Callable[[jax.Array, dict], dict]
    prepare: Callable[[dict, dict], Any]
    loss: Callable[[dict, dict, dict, Any], tuple[jax.Array, dict, dict]]


def trainable_of(state: dict, *, frozen_backbone: bool = False,
                 extra_keys: tuple[str, ...] = ()) -> dict:
    """The differentiated tree: {'params': all params (or only {'classifier'} when the backbone
    is frozen), **{k: state[k] for k in extra_keys}}. The optimizer state mirrors it."""
    params = state["params"]
    if frozen_backbone:
        params = {"classifier": params["classifier"]}
    return {"params": params, **{k: state[k] for k in extra_keys}}


def top1(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Percent of rows whose arg-max logit [B, N] equals the label [B]."""
    return 100.0 * jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def step_rngs(state: dict) -> tuple[jax.Array, jax.Array]:
    """(mixup key, dropout key) of this step: fold_in(state['rng'], state['step']), split."""
    mix_key, dropout_key = jax.random.split(jax.random.fold_in(state["rng"], state["step"]))
    return mix_key, dropout_key


def mixup(rng: jax.Array, images: jax.Array, labels: jax.Array, alpha: float):
    """Mixup (Zhang et al.), as the DVP release's ``mixup_data``: lam ~ Beta(alpha, alpha),
    one random permutation p of the batch; images [B, ...] -> lam * images + (1 - lam) *
    images[p]. Returns (mixed images, labels[p] int32 [B], lam float32 [])."""
    lam_key, perm_key = jax.random.split(rng)
    lam = jax.random.beta(lam_key, alpha, alpha).astype(jnp.float32)
    perm = jax.random.permutation(perm_key, images.shape[0])
    mixed = lam * images + (1.0 - lam) * images[perm]
    return mixed.astype(images.dtype), labels[perm], lam


def make_train_step(model, tx: optax.GradientTransformation, *, label_smoothing: float = 0.0,
                    frozen_backbone: bool = False, extra: ExtraTerm | None = None,
                    mixup_alpha: float = 0.0):
    """The pure classification step (state, batch) -> (state, metrics).

    batch: 'image' float [B, S, S, 3], 'label' int32 [B]. Loss = CE(logits, labels; label
    smoothing) (+ the extra term). ``frozen_backbone``: the model runs in inference mode
    (BN running statistics, no update) and only params['classifier'] is differentiated.
    ``mixup_alpha`` > 0: the batch is mixed first (``mixup``; the extra term, i.e. Phase 2's
    teacher, sees the mixed images too, as in the release) and CE = lam * CE(labels) +
    (1 - lam) * CE(permuted labels); train top1 is mixed the same way.
    Dropout layers (SEED's students) draw from the step's 'dropout' rng (``step_rngs``).
    Metrics: loss, ce, top1 (train, %), grad_norm (+ the extra term's metrics).
    """
    extra_keys = extra.trainable_keys if extra is not None else ()

    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        images, labels = batch["image"], batch["label"]
        mix_key, dropout_key = step_rngs(state)
        lam, labels_b = None, None
        if mixup_alpha > 0.0:
            images, labels_b, lam = mixup(mix_key, images, labels, mixup_alpha)
            batch = dict(batch, image=images)
        context = extra.prepare(state, batch) if extra is not None else None

        def criterion(logits):
            ce = objectives.softmax_cross_entropy(logits, labels, label_smoothing)
            if lam is None:
                return ce
            return lam * ce + (1.0 - lam) * objectives.softmax_cross_entropy(
                logits, labels_b, label_smoothing)

        def loss_fn(trainable):
            params = {**state["params"], **trainable["params"]}
            variables = {"params": params, "batch_stats": state["batch_stats"]}
            if frozen_backbone:
                out = model.apply(variables, images, train=False)
                batch_stats = state["batch_stats"]
            else:
                out, new_vars = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                            rngs={"dropout": dropout_key})
                batch_stats = new_vars["batch_stats"]
            ce = criterion(out["logits"])
            loss, updates, extra_metrics = ce, {}, {}
            if extra is not None:
                term, updates, extra_metrics = extra.loss(trainable, state, out, context)
                loss = ce + term
            return loss, (batch_stats, updates, ce, out["logits"], extra_metrics)

        trainable = trainable_of(state, frozen_backbone=frozen_backbone, extra_keys=extra_keys)
        (loss, (batch_stats, updates, ce, logits, extra_metrics)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(trainable)
        steps, opt_state = tx.update(grads, state["opt_state"], trainable)
        trainable = optax.apply_updates(trainable, steps)
        new_state = dict(state, **updates)
        new_state.update({k: trainable[k] for k in extra_keys})
        new_state.update(step=state["step"] + 1, opt_state=opt_state, batch_stats=batch_stats,
                         params={**state["params"], **trainable["params"]})
        accuracy = top1(logits, labels)
        if lam is not None:
            accuracy = lam * accuracy + (1.0 - lam) * top1(logits, labels_b)
        out_metrics = {"loss": loss, "ce": ce, "top1": accuracy,
                       "grad_norm": optim.global_norm(grads), **extra_metrics}
        return new_state, out_metrics

    return train_step


def make_init_state(model, tx: optax.GradientTransformation, config, *,
                    init: pretrained.Pretrained | None = None, frozen_backbone: bool = False,
                    linear_init_std: float = 0.01, extra: ExtraTerm | None = None,
                    what: str = "config.classify.init_checkpoint"):
    """rng -> the initial state. ``init``: the backbone (params and BN statistics) comes from
    this checkpoint; the classifier is new (torch's Linear init, or N(0, linear_init_std) and
    bias 0 when ``frozen_backbone``)."""
    extra_keys = extra.trainable_keys if extra is not None else ()

    def init_state(rng: jax.Array) -> dict:
        init_rng, cls_rng, extra_rng, state_rng = jax.random.split(rng, 4)
        if init is None:
            variables = model.init(init_rng, common.dummy_images(config), train=False)
            params, batch_stats = variables["params"], variables["batch_stats"]
        else:  # Only the new classifier is drawn at random (no wasted backbone init).
            params, batch_stats = warm_start_variables(model, config, init, init_rng, what)
        if frozen_backbone:
            kernel = params["classifier"]["kernel"]
            params = dict(params, classifier={
                "kernel": linear_init_std * jax.random.normal(cls_rng, kernel.shape, kernel.dtype),
                "bias": jnp.zeros_like(params["classifier"]["bias"])})
        state = dict(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     rng=state_rng)
        if extra is not None:
            state = extra.init(extra_rng, state)
        state["opt_state"] = tx.init(trainable_of(state, frozen_backbone=frozen_backbone,
                                                  extra_keys=extra_keys))
        return state

    return init_state


def warm_start_variables(model, config, init: pretrained.Pretrained, rng: jax.Array,
                         what: str) -> tuple[dict, dict]:
    """(params, batch_stats) of ``model``: the backbone (and its BN statistics) from ``init``,
    a new classifier with torch's Linear init. Traceable; the backbone's random initialisers
    are never run (on XLA:CPU compiling them costs seconds)."""
    shapes = jax.eval_shape(lambda r: model.init(r, common.dummy_images(config), train=False), rng)
    if set(shapes["params"]) != {"backbone", "classifier"}:
        raise ValueError(f"Expected a backbone + classifier model, got params {sorted(shapes['params'])}.")
    kernel = shapes["params"]["classifier"]["kernel"]
    classifier = models.Classifier(kernel.shape[1], dtype=model.dtype).init(
        rng, jnp.zeros((1, kernel.shape[0]), jnp.float32))["params"]
    params = {"backbone": init.variables["params"]["backbone"], "classifier": classifier}
    batch_stats = {"backbone": init.variables["batch_stats"]["backbone"]}
    params, batch_stats = jax.tree.map(jnp.asarray, (params, batch_stats))
    pretrained.check_same_shapes(shapes["params"], params, what)
    pretrained.check_same_shapes(shapes["batch_stats"], batch_stats, what)
    return params, batch_stats


# ----------------------------------------------------------------------------- evaluation


def accuracy_evaluator(config, model, mesh, *, split: str | None = None,
                       workdir: str | None = None, trainer: str = "",
                       transform: str = EVAL_TRANSFORM,
                       steps_per_epoch: int = 0) -> Callable[[Any], dict]:
    """state -> {'<split>_top1': %, '<split>_top5': %, '<split>_best_top1': %} of the model's
    logits on ``split`` (default input.eval_split), with inference-mode BN
    (evaluators.accuracy.Accuracy on the state's top-level variables).

    Writes WORKDIR/eval_<split>.json (this evaluation: the "final" accuracy once training
    ends) and WORKDIR/best_<split>.json ({'top1', 'top5', 'step', 'epoch', 'label'}: the
    evaluation with the highest top-1 so far, the reference code's "best val epoch"
    protocol; ties go to the later one; kept across resumes). The best is taken over the
    evaluations that ran (every loop.eval_every_epochs; the reference evaluates every epoch).
    """
    split = split or config.input.eval_split
    evaluator = Accuracy(model, common.eval_data(config), split, mesh, transform=transform)
    tag = eval_files.split_tag(split)
    track_best = eval_files.BestEpoch(workdir, split)

    def evaluate(state) -> dict:
        pred = evaluator.predict(common.encoder_variables(state))
        acc = top_k(pred.scores, pred.labels)
        step = int(jax.device_get(state["step"]))
        best = track_best({"top1": float(acc["top1"]), "top5": float(acc["top5"]), "split": split,
                           "step": step, "label": eval_files.BEST_LABEL,
                           "epoch": step / steps_per_epoch if steps_per_epoch else None})
        if workdir is not None:
            eval_files.write_eval_json(workdir, {
                "top1": acc["top1"], "top5": acc["top5"], "split": split, "step": step,
                "trainer": trainer, "num_examples": int(pred.labels.shape[0]),
                "transform": transform, "image_size": int(config.input.image_size)})
        return {f"{tag}_top1": acc["top1"], f"{tag}_top5": acc["top5"],
                f"{tag}_best_top1": best["top1"]}

    return evaluate


# ----------------------------------------------------------------------------- task


def device_step(train_step, config, mesh):
    """``train_step`` fed by ``common.train_batches_fn(config, TRAIN_TRANSFORM)``: with
    input.augment_on='device' it first makes the crops on the devices
    (dvp_jax/input/device_augment.py)."""
    from dvp_jax.input import device_augment
    return device_augment.wrap_step(train_step, config, mesh, TRAIN_TRANSFORM)


def load_init(config, what: str = "config.classify.init_checkpoint") -> pretrained.Pretrained:
    """The Phase-1 (or converted) encoder named by config.classify.init_checkpoint, head dropped."""
    directory = config.classify.init_checkpoint
    if not directory:
        raise ValueError(
            f"config.trainer={config.trainer!r} needs {what}: the 'checkpoints' folder of a "
            "Phase-1 run (e.g. --config.classify.init_checkpoint=runs/moco_digits/checkpoints) "
            "or a directory written by `python -m dvp_jax.convert_torch`.")
    step = config.classify.init_step if config.classify.init_step >= 0 else None
    return pretrained.load(directory, keep_projection=False, step=step)


def check_backbone(model, config, source: pretrained.Pretrained, what: str) -> None:
    """Refuses (before any jit) a checkpoint whose backbone does not fit the configured model;
    the message names both models and the first differing parameter's two shapes. SEED's and
    torchvision's MobileNetV3 / EfficientNet have the same shapes: their variants must match."""
    saved = source.spec.variant
    wanted = config.model.get("variant", "torchvision")
    if saved != wanted and not str(config.model.name).startswith(("resnet", "resnext", "wide_")):
        raise ValueError(f"{what}: checkpoint {source.directory!r} holds a {saved!r} "
                         f"{config.model.name}; the config asks for {wanted!r}. Pass "
                         f"--config.model.variant={saved}.")
    shapes = jax.eval_shape(lambda r: model.init(r, common.dummy_images(config), train=False),
                            jax.random.PRNGKey(0))
    try:
        pretrained.check_same_shapes(shapes["params"]["backbone"],
                                     source.variables["params"]["backbone"], what)
    except ValueError as e:
        mine = {k: getattr(source.spec, k) for k in ("name", "width_multiplier", "small_stem")}
        want = {k: config.model[k] for k in ("name", "width_multiplier", "small_stem")}
        raise type(e)(f"{e}\n  checkpoint {source.directory!r} (step {source.step}) holds model "
                      f"{mine}; the config asks for {want}.") from e


def build_task(config, mesh, workdir: str | None = None) -> loop.Task:
    """The loop.Task of a 'supervised' / 'linear' / 'finetune' run (see configs/classify.py)."""
    config_checks.validate(config)
    trainer = config.trainer
    if trainer not in choices.CLASSIFY_TRAINERS:
        raise ValueError(f"config.trainer={trainer!r}; classify.py runs "
                         f"{', '.join(choices.CLASSIFY_TRAINERS)}.")
    sizes = common.data_sizes(config, mesh)
    spec = ModelSpec.from_config(config.model, num_classes=sizes.num_classes)
    model = spec.build()
    schedule, tx = common.make_optimizer(config, sizes)
    frozen = trainer == "linear"
    init = None
    if trainer in ("linear", "finetune"):
        init = load_init(config)
        check_backbone(model, config, init, "config.classify.init_checkpoint")
    elif config.classify.init_checkpoint:
        raise ValueError(f"config.trainer='supervised' starts from random weights but "
                         f"config.classify.init_checkpoint={config.classify.init_checkpoint!r} "
                         "is set; use config.trainer='finetune' (or 'linear') to start from it.")
    train_step = make_train_step(model, tx, label_smoothing=config.classify.label_smoothing,
                                 frozen_backbone=frozen,
                                 mixup_alpha=config.classify.get("mixup_alpha", 0.0))
    meta = {"trainer": trainer, "model": spec.to_meta()}
    if init is not None:
        meta["init"] = init.describe()
    return loop.Task(
        name=trainer,
        init_state=make_init_state(model, tx, config, init=init, frozen_backbone=frozen,
                                   linear_init_std=config.classify.linear_init_std),
        train_step=device_step(common.with_lr(train_step, schedule), config, mesh),
        train_batches=common.train_batches_fn(config, TRAIN_TRANSFORM),
        total_steps=sizes.total_steps, steps_per_epoch=sizes.steps_per_epoch,
        images_per_step=config.batch_size, meta=meta,
        evaluators=[accuracy_evaluator(config, model, mesh, workdir=workdir, trainer=trainer,
                                       steps_per_epoch=sizes.steps_per_epoch)],
        eval_every_steps=common.eval_every_steps(config, sizes.steps_per_epoch))


def train(config, workdir: str, mesh=None) -> Any:
    """Runs a classification trainer in ``workdir``; returns the final state."""
    mesh = sharding.make_mesh() if mesh is None else mesh
    return loop.run(build_task(config, mesh, workdir), config, workdir, mesh)
