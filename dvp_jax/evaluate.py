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

import logging
import os
import sys
from typing import Any, Sequence

import jax

from dvp_jax import choices, console, errors, sharding
from dvp_jax.evaluators import accuracy, ensemble, eval_files, multicrop, passes
from dvp_jax.evaluators import knn as knn_lib
from dvp_jax.evaluators.data import EvalData, EvaluationError, global_batch_for
from dvp_jax.evaluators.members import Member, check_members, load_member, resolve_checkpoint_dir

log = logging.getLogger("dvp_jax")

DEFAULT_BATCH_SIZE = 256  # When neither the flags nor the checkpoint's config name one.


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
    if knn_feature not in choices.KNN_FEATURES:
        raise EvaluationError(f"knn_feature={knn_feature!r}; allowed: "
                              f"{', '.join(choices.KNN_FEATURES)}.")
    mesh = sharding.make_mesh() if mesh is None else mesh
    members = [load_member(d, step=step, input_config=input_config, input_overrides=input_overrides,
                           keep_projection=knn and knn_feature == "projection", mesh=mesh)
               for d in dirs]
    check_members(members, split, knn=knn, knn_feature=knn_feature, ten_crop=ten_crop)
    if batch_size is None:
        batch_size = (members[0].meta.get("config") or {}).get("batch_size") or DEFAULT_BATCH_SIZE
    global_batch = global_batch_for(int(batch_size), mesh)

    labels = None
    member_results = []
    classified = []  # Per model with a classifier: its Predictions (scores [N, C]).
    for i, m in enumerate(members):
        log.info("evaluating %s step %d (%s, trainer %s) on %s of %s at %d px%s%s", m.directory,
                 m.step, m.spec.name, m.trainer, split, m.input_config.source,
                 int(m.input_config.image_size), ", ten-crop" if ten_crop else "",
                 f", k-NN (k={knn_k})" if knn else "")
        res, labels, pred = _evaluate_member(
            m, split, labels, f"Model {i} ({m.directory})", ten_crop=ten_crop, knn=knn,
            knn_k=knn_k, knn_temperature=knn_temperature, knn_feature=knn_feature,
            knn_bank_split=knn_bank_split, data=EvalData(m.input_config, global_batch, True),
            mesh=mesh)
        if pred is not None:
            classified.append(pred)
        member_results.append(res)

    result: dict[str, Any] = {
        "split": split,
        "checkpoints": [m.directory for m in members],
        "steps": [m.step for m in members],
        "num_examples": int(len(labels)),
        "ten_crop": bool(ten_crop),
        "batch_size": global_batch,
    }
    if classified:
        result["num_classes"] = next(m.num_classes for m in members if m.num_classes)
        # One model: its own scores; several: the log of the mean of their softmax.
        combined = (classified[0] if len(members) == 1
                    else ensemble.combine_predictions(classified))
        result.update(accuracy.top_k(combined.scores, combined.labels))
    if knn:
        result.update(knn_k=int(knn_k), knn_temperature=float(knn_temperature),
                      knn_feature=knn_feature)
        if len(members) == 1:
            for key in ("knn_top1", "knn_top5", "knn_bank_split", "knn_bank_size"):
                result[key] = member_results[0][key]
    result["members"] = member_results
    return result


def _evaluate_member(m: Member, split: str, labels, what: str, *, ten_crop: bool, knn: bool,
                     knn_k: int, knn_temperature: float, knn_feature: str,
                     knn_bank_split: str | None, data: EvalData, mesh):
    """(member's result dict, labels [N], its classifier's passes.Predictions or None) of one
    model: its classifier's accuracy (centre crop or ten-crop) and/or its weighted k-NN
    accuracy. With both and centre crops, one pass gives the logits and the k-NN queries."""
    res = m.describe()
    model = m.spec.build()
    pred = None
    if m.num_classes:
        classifier = (multicrop.TenCropAccuracy(model, data, split, mesh) if ten_crop else
                      accuracy.Accuracy(model, data, split, mesh,
                                        feature=knn_feature if knn else None))
        pred = classifier.predict(m.variables)
        labels = passes.same_labels(labels, pred.labels, what)
        res.update(accuracy.top_k(pred.scores, labels))
    if knn:
        bank_split = knn_bank_split or m.input_config.train_split
        knn_eval = knn_lib.Knn(model, data, split, bank_split, mesh, feature=knn_feature, k=knn_k,
                           temperature=knn_temperature)
        query = pred if pred is not None and pred.features is not None else None
        if query is None:
            query = knn_eval.predict(m.variables)
            labels = passes.same_labels(labels, query.labels, what)
        acc = knn_eval(m.variables, query=query)
        res.update({f"knn_{key}": value for key, value in acc.items()})
        res.update(knn_bank_split=bank_split, knn_bank_size=int(data.info(bank_split).num_examples))
    return res, labels, pred


def _workdir_of(checkpoint_dir: str) -> str:
    """The folder holding a checkpoint directory (a run's workdir)."""
    return os.path.dirname(resolve_checkpoint_dir(checkpoint_dir).rstrip("/")) or "."


def default_output_path(checkpoint_dir: str, split: str, *, ten_crop: bool = False,
                        ensemble: bool = False) -> str:
    """DIR/../eval_<split>[_tencrop][_ensemble].json (split characters outside [\\w+-] -> '_')."""
    return eval_files.offline_eval_path(_workdir_of(checkpoint_dir), split, ten_crop=ten_crop,
                                        ensemble=ensemble)


def training_best_epoch(checkpoint_dir: str, split: str) -> dict | None:
    """The training run's "best val epoch (reference protocol)" record for ``split``
    (WORKDIR/best_<split>.json beside the checkpoints, written by the classification and
    Phase-2 trainers), or None. The evaluated checkpoint itself is the "final" one."""
    return eval_files.read_best(_workdir_of(checkpoint_dir), split)


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
    flags.DEFINE_enum("knn_feature", "pooled", list(choices.KNN_FEATURES), "Feature for the k-NN.")
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
    except errors.USER_ERRORS as e:  # The one user-error path: one line, exit code 2.
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(f.checkpoint) == 1 and not f.ten_crop and "top1" in result:
        best = training_best_epoch(f.checkpoint[0], f.split)
        if best is not None:
            result["best_val_epoch"] = best
    if jax.process_index() == 0:
        out = f.out or default_output_path(f.checkpoint[0], f.split, ten_crop=f.ten_crop,
                                           ensemble=len(f.checkpoint) > 1)
        eval_files.write_json(out, result)
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
