"""The paper's experiment in one call: the rows of Table 1, evaluated on val and test.

For every seed in ``config.seeds``, in ``WORKDIR/seed_<s>/<stage>``:

    supervised  classification from scratch (no teacher)
    random      the untrained encoder of Phase 1 (same architecture and initial weights), its
                BN running statistics fitted on the augmented train images exactly as Phase 1
                fits its own (Phase 1's config with learning rate 0 for
                ``config.random_init_bn_epochs``); evaluated by the same k-NN
    moco        Phase 1: margin-MoCo pretraining (k-NN monitor)
    linear      Phase 1 + linear readout (frozen backbone)
    finetune    Phase 1 + full finetune
    distill     Phase 1 + Phase 2 (self-distillation from the frozen Phase-1 encoder)

Each stage is a full trainer config under ``config.stages.<stage>``; the runner copies the
shared ``config.input`` and ``config.model`` and the seed into it, and wires the Phase-1
checkpoint into the stages that start from it. A stage that finished is skipped (its
``done.json`` holds its evaluation) unless its config changed since (then it runs again: the
loop continues it or refuses the change); an interrupted one resumes from its last checkpoint.
Top-level ``config.loop`` keys left unset (None) keep each stage's own value; set ones (e.g.
``--config.loop.checkpoint_every_steps=100``) apply to every stage.
Then ``WORKDIR/results.json``, ``results.md``, ``curves.png`` and ``accuracy.png`` are written
(process 0) and the table is printed.
"""
from __future__ import annotations

import os

import jax
import ml_collections
from dvp_jax import config_checks, console, fileio, loop, report, train, workdir_config
from dvp_jax.evaluators import eval_files

STAGES = ("supervised", "random", "moco", "linear", "finetune", "distill")
# stage -> (row label of Table 1, starts from Phase 1).
ROWS = {
    "supervised": ("Supervised from scratch", False),
    "random": ("Random init (k-NN on the frozen encoder)", False),
    "moco": ("Phase 1 (k-NN on the frozen encoder)", False),
    "linear": ("Phase 1 + linear readout", True),
    "finetune": ("Phase 1 + finetune", True),
    "distill": ("Phase 1 + Phase 2 (ours)", True),
}
KNN_STAGES = ("random", "moco")  # Rows measured by the k-NN of the frozen encoder.
# Paired per-seed comparisons of Table 1: (label, stage a, stage b) -> a - b.
PAIRS = (("Phase 2 - supervised", "distill", "supervised"),
         ("Phase 2 - finetune", "distill", "finetune"),
         ("finetune - supervised", "finetune", "supervised"),
         ("Phase 1 k-NN - random k-NN", "moco", "random"))


def sweep_stage(weight: float) -> str:
    """Stage name of one Phase-2 lambda of ``config.distill_sweep``, e.g. 'distill_lambda_0.01'."""
    return f"distill_lambda_{weight:g}"


def stages_and_rows(config) -> tuple[list[str], dict]:
    """The stages run for every seed (STAGES, then one per ``config.distill_sweep`` lambda)
    and their row labels."""
    sweep = tuple(float(w) for w in config.get("distill_sweep", ()))
    rows = dict(ROWS)
    for w in sweep:
        rows[sweep_stage(w)] = (f"Phase 1 + Phase 2, lambda = {w:g} (sweep)", True)
    stages = list(STAGES) + [sweep_stage(w) for w in sweep]
    return [s for s in stages if s not in config.skip_stages], rows


def random_init_config(moco_stage, bn_epochs: float) -> ml_collections.ConfigDict:
    """The 'random' stage: Phase 1's config with learning rate and weight decay 0 for
    ``bn_epochs``: the weights stay at Phase 1's initial values (same seed), the momentum
    encoder equals them, and only the BN running statistics move (to the augmented train
    images' statistics, with Phase 1's BN groups)."""
    c = ml_collections.ConfigDict(moco_stage.to_dict())
    c.optim.base_lr = 0.0
    c.optim.weight_decay = 0.0
    c.optim.schedule = "constant"
    c.optim.warmup_epochs = 0.0
    c.num_epochs = float(bn_epochs)
    c.loop.eval_every_epochs = 0.0
    return c


def stage_config(config, stage: str, seed: int, workdir: str) -> ml_collections.ConfigDict:
    """The trainer config of one stage: shared input/model/seed copied in, Phase 1 wired."""
    if stage == "random":
        c = random_init_config(config.stages.moco, config.random_init_bn_epochs)
    elif stage.startswith("distill_lambda_"):
        c = ml_collections.ConfigDict(config.stages.distill.to_dict())
        c.distill.weight = float(stage[len("distill_lambda_"):])
    else:
        c = ml_collections.ConfigDict(config.stages[stage].to_dict())
    c.input = ml_collections.ConfigDict(config.input.to_dict())
    c.model = ml_collections.ConfigDict(config.model.to_dict())
    c.seed = seed
    for key, value in config.get("loop", {}).items():  # Top-level --config.loop.* overrides.
        if value is not None:
            c.loop[key] = value
    phase1 = os.path.join(workdir, f"seed_{seed}", "moco", "checkpoints")
    if stage in ("linear", "finetune"):
        c.classify.init_checkpoint = phase1
    elif stage.startswith("distill"):
        c.distill.teacher_checkpoint = phase1
    return c


def _evaluate_stage(stage: str, stage_dir: str, splits, stage_cfg) -> dict:
    from dvp_jax import evaluate
    ckpt = os.path.join(stage_dir, "checkpoints")
    results = {}
    for split in splits:
        knn = stage in KNN_STAGES
        r = evaluate.evaluate_checkpoints(
            [ckpt], split=split, input_config=stage_cfg.input, knn=knn,
            knn_k=stage_cfg.knn.k if knn else 200,
            knn_temperature=stage_cfg.knn.temperature if knn else 0.1,
            batch_size=stage_cfg.batch_size)
        results[split] = r["knn_top1"] if knn else r["top1"]
    return results


def finished_record(stage_dir: str, stage_cfg) -> dict | None:
    """The stage's done.json record if it finished with exactly ``stage_cfg``, else None.

    A finished stage whose saved config (STAGE_DIR/config.json) differs from ``stage_cfg``
    (apart from workdir_config.RESUMABLE_CHANGES such as log intervals) is run again: the loop then continues it (changes it can resume with, e.g. more epochs) or
    refuses it naming the changed keys, as for any workdir.
    """
    done_path = os.path.join(stage_dir, "done.json")
    config_path = os.path.join(stage_dir, "config.json")
    if not os.path.exists(done_path):
        return None
    saved = None
    if os.path.exists(config_path):
        saved = fileio.read_json(config_path)
    changed = workdir_config.changed_keys(saved or {}, workdir_config.config_to_dict(stage_cfg))
    if saved is None or changed:
        if jax.process_index() == 0:
            console.say(f"{stage_dir}: the stage config changed since it finished; "
                        "running it again.")
        return None
    return fileio.read_json(done_path)


def run_stage(config, stage: str, seed: int, workdir: str) -> dict:
    """Trains (or resumes, or skips) one stage and returns {'val': top1, 'test': top1, ...}."""
    stage_dir = os.path.join(workdir, f"seed_{seed}", stage)
    done_path = os.path.join(stage_dir, "done.json")
    c = stage_config(config, stage, seed, workdir)
    record = finished_record(stage_dir, c)
    if record is not None:
        if jax.process_index() == 0:
            console.say(f"seed {seed} · {stage}: finished earlier, skipped ({done_path}); " +
                        _accuracy_text(record["accuracy"]))
        return record
    loop.set_stage_label(f"seed {seed} · {stage}")
    train.train_and_evaluate(c, stage_dir)
    loop.set_stage_label("")
    accuracies = _evaluate_stage(stage, stage_dir, config.eval_splits, c)
    if jax.process_index() == 0:
        console.say(f"seed {seed} · {stage}: " + _accuracy_text(accuracies))
    uses_phase1 = stage not in ("supervised", "random")
    # 'accuracy' is the final epoch's; 'best_val_epoch' the reference code's protocol (the
    # best of the periodic evaluations on input.eval_split; None for the k-NN of Phase 1).
    record = {"stage": stage, "seed": seed, "accuracy": accuracies, "accuracy_label": "final",
              "best_val_epoch": eval_files.read_best(stage_dir, c.input.eval_split),
              "pretrain_epochs": config.stages.moco.num_epochs if uses_phase1 else 0,
              "train_epochs": 0 if stage in KNN_STAGES else c.num_epochs,
              "workdir": stage_dir}
    if jax.process_index() == 0:
        fileio.write_json(done_path, record, sort_keys=False)
    return record


def _accuracy_text(accuracies: dict) -> str:
    """'val top-1 85.00  test top-1 83.20' (k-NN top-1 for the Phase 1 stage)."""
    return "  ".join(f"{split} top-1 {float(v):.2f}" for split, v in accuracies.items())


def describe(config) -> str:
    """'Table 1: stages supervised, random, moco, linear, finetune, distill x seeds 0, 1, 2'."""
    stages, _ = stages_and_rows(config)
    seeds = ", ".join(str(s) for s in config.seeds)
    return f"Table 1: stages {', '.join(stages)} x seeds {seeds}"


def run(config, workdir: str) -> dict:
    """Runs every stage for every seed, then writes and prints the results table."""
    config_checks.validate(config)  # The shared keys (input, model, loop); stages: below.
    workdir_config.check_or_save_config(config, workdir)
    records = []
    stages, rows = stages_and_rows(config)
    for seed in config.seeds:
        for stage in stages:
            records.append(run_stage(config, stage, seed, workdir))
    results = report.summarise(records, rows, config.eval_splits)
    paired = report.paired_differences(records, PAIRS, config.eval_splits)
    if jax.process_index() == 0:
        report.write_all(results, records, workdir, paired=paired)
        print(report.markdown_table(results, config.eval_splits, paired), flush=True)
    return results

