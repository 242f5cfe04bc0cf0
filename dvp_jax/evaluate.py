r"""Evaluation from Orbax checkpoints: top-1 / top-5, weighted k-NN, ten-crop, ensembles.

    python -m dvp_jax.evaluate --checkpoint=runs/distill/checkpoints [--split=val]
    python -m dvp_jax.evaluate --checkpoint=runs/moco --knn            # encoder without classifier
    python -m dvp_jax.evaluate --checkpoint=A/checkpoints --checkpoint=B/checkpoints --ten_crop
    python -m dvp_jax.evaluate --checkpoint=/tmp/r50_converted --source=folder:data/vipriors \
        --image_size=224 --knn

Flags: --checkpoint DIR (repeatable; a workdir's 'checkpoints' folder, the workdir itself, or a
folder written by ``python -m dvp_jax.convert_torch``), --step N (default: the latest), --split
(default 'val'), --config=configs/FILE.py:PRESET (its ``input`` section, ``batch_size`` and
``knn`` section replace what the checkpoint recorded), --source / --image_size (override both),
--batch_size, --knn [--knn_k 200 --knn_temperature 0.1 --knn_feature pooled --knn_bank_split],
--ten_crop, --out FILE.json (default DIR/../eval_<split>[_tencrop][_ensemble].json).
Multi-host: run the same command on every process (flags of dvp_jax/distributed.py); only
process 0 prints and writes. Console: one summary line and the output path on stdout;
library logs (Orbax, TensorFlow) and the per-model detail lines only with --verbosity
(-1 warnings, 0 info; dvp_jax/console.py). --help exits 0.

What is measured (percentages over the split, every example counted once):
  * top1 / top5 of the classifier ('logits'); with --ten_crop, of the mean over the ten crops of
    the softmax; with several checkpoints (an ensemble), of the mean over the models of the
    softmax (each over its ten crops with --ten_crop). Means of softmax are ranked in the log
    domain (logsumexp of log-softmax), which orders classes exactly as the mean does without
    underflowing to ties.
  * knn_top1 / knn_top5 (--knn): MoCo's weighted k-NN on L2-normalised features ('pooled' by
    default) of centre crops: bank = ``input.train_split`` (or --knn_bank_split), k nearest by
    cosine, weights exp(cos / T). The only choice for encoders without a classifier (MoCo, SEED,
    converted SSL weights). Per model, also inside an ensemble (reported under 'members').

Data settings of each model: ``config_base.input_config()`` updated with the input section its
checkpoint recorded (``meta['config']['input']``), or with ``input_config`` / --config when
given, then with --source / --image_size. A converted checkpoint records none, so it needs
--source and --image_size (or --config).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dvp_jax import (checkpoints, config_base, console, errors, features, fileio, metrics,
                     pretrained, sharding)
from dvp_jax.models.spec import ModelSpec

log = logging.getLogger("dvp_jax")

DEFAULT_BATCH_SIZE = 256  # When neither the flags nor the checkpoint's config name one.
KNN_FEATURES = ("pooled", "projection")


class EvaluationError(errors.UserError, ValueError):
    """The checkpoints and options asked for cannot be evaluated; the message says why."""


# ----------------------------------------------------------------------------- checkpoints


def resolve_checkpoint_dir(path: str) -> str:
    """A checkpoint directory: ``path`` itself, or ``path/checkpoints`` for a workdir."""
    from etils import epath
    p = epath.Path(os.fspath(path))
    try:
        has_steps = p.is_dir() and any(c.name.isdigit() for c in p.iterdir())
        nested = (p / "checkpoints")
        if not has_steps and nested.is_dir():
            return os.fspath(nested)
    except OSError:  # Unreadable / remote errors: let checkpoints.* report the path.
        pass
    return os.fspath(path)


@dataclasses.dataclass
class Member:
    """One restored model of the evaluation (an ensemble has several)."""
    directory: str
    step: int
    trainer: str
    model_meta: dict  # The model as the checkpoint recorded it.
    spec: ModelSpec  # The model built: bn_groups 1, unused heads dropped.
    variables: dict  # {'params', 'batch_stats'} replicated on the mesh.
    input_config: Any  # ml_collections.ConfigDict
    num_classes: int  # Classifier outputs; 0 = none.
    meta: dict  # The checkpoint's meta (trainer, model, config, ...).

    def describe(self) -> dict:
        return {"directory": self.directory, "step": self.step, "trainer": self.trainer,
                "model": self.model_meta, "source": self.input_config.source,
                "image_size": int(self.input_config.image_size)}


def _as_dict(section) -> dict:
    if section is None:
        return {}
    if hasattr(section, "to_dict"):
        return section.to_dict()
    return dict(section)


def make_input_config(meta: dict, input_config=None, overrides: dict | None = None,
                      directory: str = "the checkpoint"):
    """The input ConfigDict used to evaluate a checkpoint with ``meta`` (see module docstring)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    saved = (meta.get("config") or {}).get("input")
    if input_config is not None:
        section = _as_dict(input_config)
    elif saved:
        section = dict(saved)
    else:
        missing = [f"--{k}" for k in ("source", "image_size") if k not in overrides]
        if missing:
            raise EvaluationError(
                f"The checkpoint at {directory!r} (trainer {meta.get('trainer', '?')!r}) records "
                f"no data settings; pass {' and '.join(missing)} (source: digits | synthetic | "
                f"tfds:NAME | folder:PATH), or --config=configs/FILE.py:PRESET.")
        section = {}
    config = config_base.input_config()
    for key, value in list(section.items()) + list(overrides.items()):
        try:
            current = config.get(key)
            if isinstance(current, int) and not isinstance(current, bool) \
                    and isinstance(value, float) and value.is_integer():
                value = int(value)  # JSON may have turned an int into a float.
            config[key] = value
        except (TypeError, ValueError) as e:
            raise EvaluationError(f"input.{key}={value!r} for {directory!r}: {e}") from e
    return config


def load_member(directory: str, *, step: int | None = None, input_config=None,
                input_overrides: dict | None = None, keep_projection: bool = False,
                mesh=None) -> Member:
    """Restores one checkpoint, builds its model (bn_groups 1) and checks its parameter shapes."""
    directory = resolve_checkpoint_dir(directory)
    if step is not None:
        checkpoints.latest_step(directory)  # Clear errors for a missing / non-Orbax directory.
        steps = checkpoints.manager(directory, max_to_keep=None, read_only=True).all_steps()
        if step not in steps:
            raise checkpoints.CheckpointError(
                f"{directory!r} holds no step {step}; its steps are {sorted(steps)}.")
    pre = pretrained.load(directory, keep_projection=keep_projection, keep_classifier=True,
                          step=step)
    spec = pre.spec
    params = pre.variables["params"]
    num_classes = spec.num_classes
    if num_classes and "classifier" not in params:
        raise checkpoints.CheckpointError(
            f"The checkpoint at {directory!r} names a {num_classes}-way classifier but holds no "
            f"'classifier' parameters.")
    if "classifier" in params and not num_classes:
        params = {k: v for k, v in params.items() if k != "classifier"}
    model = spec.build()
    in_config = make_input_config(pre.meta, input_config, input_overrides, directory)
    size = int(in_config.image_size)
    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, size, size, 3)), train=False))
    variables = {"params": params, "batch_stats": pre.variables["batch_stats"]}
    what = f"checkpoint {directory!r} (model {spec.name!r})"
    pretrained.check_same_shapes(expected["params"], variables["params"], what)
    pretrained.check_same_shapes(expected.get("batch_stats", {}), variables["batch_stats"], what)
    mesh = sharding.make_mesh() if mesh is None else mesh
    variables = sharding.put_replicated(jax.tree.map(np.asarray, variables), mesh)
    return Member(directory, int(pre.step), str(pre.meta.get("trainer", "?")),
                  dict(pre.meta["model"]), spec, variables, in_config, num_classes,
                  pre.meta)


# ----------------------------------------------------------------------------- predictions


def log_mean_softmax(logits: jax.Array, axis: int) -> jax.Array:
    """log(mean over ``axis`` of softmax(logits)), computed stably: [..., n, ..., C] -> [..., C]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jax.scipy.special.logsumexp(logp, axis=axis) - jnp.log(logits.shape[axis])


def make_predict(model, *, scores: bool, feature: str | None) -> features.PredictFn:
    """(variables, images) -> float32 [B, C + D], the outputs one pass needs side by side.

    The first C columns (if ``scores``): logits for images [B, S, S, 3]; for ten-crop images
    [B, 10, S, S, 3] the log of the mean over crops of the softmax. The last D columns (if
    ``feature``): that output ('pooled' / 'projection') of centre crops ([B, S, S, 3] only).
    """
    logits_of = features.model_output(model, "logits")

    def predict(variables, images):
        if images.ndim == 5:
            if feature is not None:
                raise ValueError("Features for k-NN come from centre crops, not ten crops.")
            return log_mean_softmax(logits_of(variables, images), axis=1)
        out = model.apply(variables, images, train=False)
        parts = ([out["logits"]] if scores else []) + ([out[feature]] if feature else [])
        return jnp.concatenate([p.astype(jnp.float32) for p in parts], axis=-1)

    return predict


def _global_batch(batch_size: int, mesh) -> int:
    """``batch_size`` rounded up to a multiple of the data shards and of the processes."""
    unit = math.lcm(sharding.num_data_shards(mesh), jax.process_count())
    rounded = max(unit, -(-int(batch_size) // unit) * unit)
    if rounded != batch_size:
        log.info("evaluation batch %d rounded up to %d (a multiple of %d devices/processes)",
                 batch_size, rounded, unit)
    return rounded


@functools.lru_cache(maxsize=32)
def _cached_predict(spec: ModelSpec, scores: bool, feature: str | None) -> features.PredictFn:
    """One predict function per (model, outputs): features.extract compiles it once and every
    pass and every member of an ensemble reuses that program."""
    return make_predict(spec.build(), scores=scores, feature=feature)


def _run_pass(member: Member, split: str, transform: str, *, scores: bool, feature: str | None,
              global_batch: int, mesh) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
    """(scores [N, C] or None, features [N, D] or None, labels [N]) of one pass over ``split``,
    padding dropped, identical on every process."""
    from dvp_jax.input import pipeline
    predict = _cached_predict(member.spec, bool(scores), feature)
    batches = pipeline.make_eval_iterator(member.input_config, split, transform,
                                          global_batch=global_batch,
                                          image_size=int(member.input_config.image_size))
    try:
        out, labels = features.extract(predict, member.variables, batches, mesh)
    except ValueError as e:
        raise EvaluationError(f"Split {split!r} of {member.input_config.source!r}: {e}") from e
    c = member.num_classes if scores else 0
    return (out[:, :c] if scores else None), (out[:, c:] if feature else None), labels


def _bank_pass(member: Member, split: str, feature: str, global_batch: int, mesh):
    """The k-NN bank of ``split`` (centre crops, ``feature``) as a metrics.ShardedBank: rows
    stay split over the devices, never gathered to a host."""
    from dvp_jax.input import pipeline
    predict = _cached_predict(member.spec, False, feature)
    batches = pipeline.make_eval_iterator(member.input_config, split, "eval_center",
                                          global_batch=global_batch,
                                          image_size=int(member.input_config.image_size))
    try:
        return features.extract_bank(predict, member.variables, batches, mesh,
                                     _split_info(member.input_config, split).num_examples)
    except ValueError as e:
        raise EvaluationError(f"Split {split!r} of {member.input_config.source!r}: {e}") from e


def _split_info(input_config, split: str):
    from dvp_jax.input import sources
    return sources.get_source(input_config).info(split)


def _same_labels(reference: np.ndarray | None, labels: np.ndarray, what: str) -> np.ndarray:
    if reference is not None and not np.array_equal(reference, labels):
        raise EvaluationError(
            f"{what} saw other examples than the first model ({len(labels)} vs {len(reference)} "
            f"examples or different labels): all models of an ensemble must be evaluated on the "
            f"same data (check their input.source / splits, or pass --source).")
    return labels


def _accuracy(scores: np.ndarray, labels: np.ndarray, prefix: str = "") -> dict:
    acc = metrics.accuracy_from_scores(scores, labels, ks=(1, 5))
    return {f"{prefix}top1": acc["top1"], f"{prefix}top5": acc["top5"]}


# ----------------------------------------------------------------------------- the evaluation


def evaluate_checkpoints(checkpoint_dirs: Sequence[str], *, split: str, input_config=None,
                         ten_crop: bool = False, knn: bool = False, knn_k: int = 200,
                         knn_temperature: float = 0.1, batch_size: int | None = None, mesh=None,
                         step: int | None = None, input_overrides: dict | None = None,
                         knn_feature: str = "pooled", knn_bank_split: str | None = None) -> dict:
    """Evaluates one checkpoint or an ensemble on ``split``; returns a JSON-able dict.

    Args:
      checkpoint_dirs: checkpoint folders (or workdirs holding 'checkpoints'); several = an
        ensemble (mean of softmax; all need classifiers with the same number of classes).
      split: the split evaluated ('val', 'test', 'train+val[:10%]', ...).
      input_config: input section (ConfigDict or dict) used for every model instead of the one
        each checkpoint recorded; None = the recorded one.
      ten_crop: classify from the mean softmax over ten crops ('ten_crop' transform).
      knn: also weighted k-NN top-1/top-5 of every model (k = knn_k, weights exp(cos / T)).
      batch_size: global evaluation batch (rounded up to a multiple of the devices); None = the
        first checkpoint's config.batch_size, else 256.
      step: restore this step of every checkpoint (None = latest).
      input_overrides: input keys set last (e.g. {'source': ..., 'image_size': ...}).
      knn_feature: 'pooled' (backbone) or 'projection' (MLP head output, if the model has one).
      knn_bank_split: the k-NN bank (default: input.train_split).

    Returns:
      {'split', 'checkpoints' [dirs], 'steps', 'num_examples', 'num_classes', 'ten_crop',
       'top1', 'top5' (if classifiers), 'knn_top1', 'knn_top5', 'knn_k', 'knn_temperature',
       'knn_feature', 'knn_bank_split' (if knn, one model), 'members' (per-model details and
       metrics)}. Accuracies in percent. Raises CheckpointError / EvaluationError / DataError.
    """
    dirs = [os.fspath(d) for d in checkpoint_dirs]
    if not dirs:
        raise EvaluationError("No checkpoint given: pass --checkpoint=DIR (repeat for an "
                              "ensemble).")
    if knn_feature not in KNN_FEATURES:
        raise EvaluationError(f"knn_feature={knn_feature!r}; allowed: {', '.join(KNN_FEATURES)}.")
    mesh = sharding.make_mesh() if mesh is None else mesh
    members = [load_member(d, step=step, input_config=input_config, input_overrides=input_overrides,
                           keep_projection=knn and knn_feature == "projection", mesh=mesh)
               for d in dirs]

    with_classifier = [m for m in members if m.num_classes]
    if len(members) > 1 and len(with_classifier) < len(members):
        bad = [m.directory for m in members if not m.num_classes]
        raise EvaluationError(
            f"An ensemble averages classifier outputs, but {', '.join(bad)} has no classifier "
            f"(trainer {[m.trainer for m in members if not m.num_classes]}); evaluate such "
            f"encoders one at a time with --knn.")
    if len({m.num_classes for m in with_classifier}) > 1:
        raise EvaluationError(
            "The models of an ensemble must have the same number of classes; got " +
            ", ".join(f"{m.directory}: {m.num_classes}" for m in members) + ".")
    if not with_classifier and not knn:
        raise EvaluationError(
            f"{members[0].directory} holds an encoder without a classifier (trainer "
            f"{members[0].trainer!r}, model {members[0].spec.name!r}): pass --knn "
            f"for weighted k-NN accuracy, or evaluate a linear / finetune / distill checkpoint.")
    if ten_crop and not with_classifier:
        raise EvaluationError("--ten_crop averages classifier softmax over crops; "
                              f"{members[0].directory} has no classifier (use --knn alone).")
    for m in with_classifier:
        info = _split_info(m.input_config, split)
        if info.num_classes != m.num_classes:
            raise EvaluationError(
                f"{m.directory} has a {m.num_classes}-way classifier but split {split!r} of "
                f"source {m.input_config.source!r} has {info.num_classes} classes: wrong data? "
                f"(pass --source / --config to choose it).")
    if knn and knn_feature == "projection":
        no_head = [m.directory for m in members if not m.spec.projection_dims]
        if no_head:
            raise EvaluationError(f"knn_feature='projection' but {', '.join(no_head)} has no "
                                  f"projection head; use knn_feature='pooled'.")

    if batch_size is None:
        batch_size = (members[0].meta.get("config") or {}).get("batch_size") or DEFAULT_BATCH_SIZE
    global_batch = _global_batch(int(batch_size), mesh)

    labels = None
    member_results = []
    log_probs = []  # Per model: log of its (crop-averaged) softmax [N, C].
    single_scores = None
    for i, m in enumerate(members):
        res = m.describe()
        what = f"Model {i} ({m.directory})"
        log.info("evaluating %s step %d (%s, trainer %s) on %s of %s at %d px%s%s", m.directory,
                 m.step, m.spec.name, m.trainer, split, m.input_config.source,
                 int(m.input_config.image_size), ", ten-crop" if ten_crop else "",
                 f", k-NN (k={knn_k})" if knn else "")
        # Centre pass: logits and/or k-NN query features in one go when both are wanted.
        query = None
        if m.num_classes and not ten_crop:
            s, query, lab = _run_pass(m, split, "eval_center", scores=True,
                                      feature=knn_feature if knn else None,
                                      global_batch=global_batch, mesh=mesh)
            labels = _same_labels(labels, lab, what)
            single_scores = s
            log_probs.append(np.asarray(jax.nn.log_softmax(jnp.asarray(s), axis=-1)))
            res.update(_accuracy(s, labels))
        elif m.num_classes:  # ten_crop
            s, _, lab = _run_pass(m, split, "ten_crop", scores=True, feature=None,
                                  global_batch=global_batch, mesh=mesh)
            labels = _same_labels(labels, lab, what)
            single_scores = s
            log_probs.append(s)
            res.update(_accuracy(s, labels))
        if knn:
            if query is None:
                _, query, lab = _run_pass(m, split, "eval_center", scores=False,
                                          feature=knn_feature, global_batch=global_batch,
                                          mesh=mesh)
                labels = _same_labels(labels, lab, what)
            bank_split = knn_bank_split or m.input_config.train_split
            bank = _bank_pass(m, bank_split, knn_feature, global_batch, mesh)
            num_classes = max(_split_info(m.input_config, bank_split).num_classes,
                              int(jax.device_get(jnp.max(bank.labels))) + 1,
                              int(labels.max(initial=0)) + 1)
            knn_scores = metrics.sharded_knn_scores(query, bank, num_classes=num_classes,
                                                    k=knn_k, temperature=knn_temperature,
                                                    mesh=mesh)
            res.update(_accuracy(knn_scores, labels, prefix="knn_"))
            res.update(knn_bank_split=bank_split, knn_bank_size=int(bank.size))
            del bank
        member_results.append(res)

    result: dict[str, Any] = {
        "split": split,
        "checkpoints": [m.directory for m in members],
        "steps": [m.step for m in members],
        "num_examples": int(len(labels)),
        "ten_crop": bool(ten_crop),
        "batch_size": global_batch,
    }
    if with_classifier:
        result["num_classes"] = with_classifier[0].num_classes
        if len(members) == 1:
            combined = single_scores
        else:  # log of the mean over models of the softmax.
            combined = np.logaddexp.reduce(np.stack(log_probs).astype(np.float64), axis=0) \
                - np.log(len(log_probs))
        result.update(_accuracy(combined.astype(np.float32), labels))
    if knn:
        result.update(knn_k=int(knn_k), knn_temperature=float(knn_temperature),
                      knn_feature=knn_feature)
        if len(members) == 1:
            for key in ("knn_top1", "knn_top5", "knn_bank_split", "knn_bank_size"):
                result[key] = member_results[0][key]
    result["members"] = member_results
    return result


def default_output_path(checkpoint_dir: str, split: str, *, ten_crop: bool = False,
                        ensemble: bool = False) -> str:
    """DIR/../eval_<split>[_tencrop][_ensemble].json (split characters outside [\\w+-] -> '_')."""
    directory = resolve_checkpoint_dir(checkpoint_dir).rstrip("/")
    name = "eval_" + re.sub(r"[^\w+\-]", "_", split)
    name += ("_tencrop" if ten_crop else "") + ("_ensemble" if ensemble else "")
    return os.path.join(os.path.dirname(directory) or ".", name + ".json")


def write_json(result: dict, path: str) -> None:
    """Writes ``result`` as indented JSON (local path or gs://), creating the parent folder."""
    fileio.write_json(path, result)


def training_best_epoch(checkpoint_dir: str, split: str) -> dict | None:
    """The training run's "best val epoch (reference protocol)" record for ``split``
    (WORKDIR/best_<split>.json beside the checkpoints, written by the classification and
    Phase-2 trainers), or None. The evaluated checkpoint itself is the "final" one."""
    from dvp_jax.evaluators import eval_files
    workdir = os.path.dirname(resolve_checkpoint_dir(checkpoint_dir).rstrip("/")) or "."
    return eval_files.read_best(workdir, split)


def summary_line(result: dict) -> str:
    """One human line: 'val (N examples): top1 ... top5 ... knn_top1 ...'."""
    keys = [k for k in ("top1", "top5", "knn_top1", "knn_top5") if k in result]
    what = f"{len(result['checkpoints'])}-model ensemble" if len(result["checkpoints"]) > 1 \
        else result["checkpoints"][0]
    crop = ", ten-crop" if result.get("ten_crop") else ""
    line = (f"{what} on {result['split']} ({result['num_examples']} examples{crop}): " +
            "  ".join(f"{k} {result[k]:.2f}" for k in keys))
    best = result.get("best_val_epoch")
    if best:
        epoch = f" at epoch {best['epoch']:g}" if best.get("epoch") is not None else ""
        line += (f"\n  final (this checkpoint) top1 {result.get('top1', float('nan')):.2f}; "
                 f"{best['label']}: top1 {best['top1']:.2f}{epoch} (step {best['step']}, "
                 "from training)")
    return line


# ----------------------------------------------------------------------------- command line


def is_user_error(e: BaseException) -> bool:
    """A missing / unreadable checkpoint, impossible options or unusable data: reported in one
    line (exit code 2) instead of a traceback."""
    return isinstance(e, (checkpoints.CheckpointError, EvaluationError, errors.DataError))


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    from dvp_jax import distributed
    flags.DEFINE_multi_string("checkpoint", None, "Checkpoint folder (repeat for an ensemble).")
    config_flags.DEFINE_config_file("config", None, "configs/FILE.py[:PRESET]: its input section, "
                                    "batch_size and knn section replace the checkpoint's.",
                                    lock_config=True)
    flags.DEFINE_string("split", "val", "Split to evaluate.")
    flags.DEFINE_string("source", None, "digits | synthetic | tfds:NAME | folder:PATH.")
    flags.DEFINE_integer("image_size", None, "Crop resolution fed to the network (pixels).")
    flags.DEFINE_integer("batch_size", None, "Global evaluation batch.")
    flags.DEFINE_bool("knn", False, "Weighted k-NN accuracy (train split as the bank).")
    flags.DEFINE_integer("knn_k", 200, "Neighbours of the weighted k-NN.")
    flags.DEFINE_float("knn_temperature", 0.1, "k-NN weights exp(cos / T).")
    flags.DEFINE_enum("knn_feature", "pooled", list(KNN_FEATURES), "Feature for the k-NN.")
    flags.DEFINE_string("knn_bank_split", None, "k-NN bank split (default input.train_split).")
    flags.DEFINE_bool("ten_crop", False, "Mean softmax over ten crops.")
    flags.DEFINE_string("out", None, "JSON output (default DIR/../eval_<split>.json).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.mark_flag_as_required("checkpoint")
    distributed.define_flags()


def _main(argv) -> int:
    from absl import flags

    from dvp_jax import distributed
    f = flags.FLAGS
    console.setup(f.verbosity if f["verbosity"].present else None)
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    try:
        distributed.initialize()
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    jax.devices()  # The JAX backends first, then TensorFlow (see dvp_jax/main.py).
    console.import_tensorflow_quietly()  # The evaluation data comes through tf.data.
    config = f.config
    input_config, batch_size, knn_k, knn_t = None, f.batch_size, f.knn_k, f.knn_temperature
    if config is not None:
        input_config = config.get("input")
        if batch_size is None and config.get("batch_size"):
            batch_size = int(config.batch_size)
        knn_section = config.get("knn")
        if knn_section is not None:
            knn_k = knn_k if f["knn_k"].present else int(knn_section.get("k", knn_k))
            knn_t = knn_t if f["knn_temperature"].present else float(
                knn_section.get("temperature", knn_t))
    try:
        result = evaluate_checkpoints(
            f.checkpoint, split=f.split, input_config=input_config, ten_crop=f.ten_crop,
            knn=f.knn, knn_k=knn_k, knn_temperature=knn_t, batch_size=batch_size, step=f.step,
            input_overrides={"source": f.source, "image_size": f.image_size},
            knn_feature=f.knn_feature, knn_bank_split=f.knn_bank_split)
    except Exception as e:  # pylint: disable=broad-except
        if not is_user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(f.checkpoint) == 1 and not f.ten_crop and "top1" in result:
        best = training_best_epoch(f.checkpoint[0], f.split)
        if best is not None:
            result["best_val_epoch"] = best
    if jax.process_index() == 0:
        out = f.out or default_output_path(f.checkpoint[0], f.split, ten_crop=f.ten_crop,
                                           ensemble=len(f.checkpoint) > 1)
        write_json(result, out)
        print(summary_line(result))
        print(f"wrote {out}")
    return 0


def main() -> None:
    """Entry point of ``python -m dvp_jax.evaluate``."""
    from absl import app
    _define_flags()
    app.run(_main, flags_parser=_parse_flags)


def _parse_flags(argv):
    """absl's parser, except that --help exits 0."""
    from absl import flags
    console.exit_on_help(argv)
    return flags.FLAGS(argv)


if __name__ == "__main__":
    main()
