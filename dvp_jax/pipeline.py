"""The paper's experiment in one call: the rows of Table 1, evaluated on val and test.

For every seed in ``config.seeds``, in ``WORKDIR/seed_<s>/<stage>``:

    supervised  classification from scratch (no teacher)
    moco        Phase 1: margin-MoCo pretraining (k-NN monitor)
    linear      Phase 1 + linear readout (frozen backbone)
    finetune    Phase 1 + full finetune
    distill     Phase 1 + Phase 2 (self-distillation from the frozen Phase-1 encoder)

Each stage is a full trainer config under ``config.stages.<stage>``; the pipeline copies the
shared ``config.input`` and ``config.model`` and the seed into it, and wires the Phase-1
checkpoint into the stages that start from it. A stage that finished is skipped (its
``done.json`` holds its evaluation); an interrupted one resumes from its last checkpoint.
Then ``WORKDIR/results.json``, ``results.md``, ``curves.png`` and ``accuracy.png`` are written
(process 0) and the table is printed.
"""
from __future__ import annotations

import importlib
import os

import jax
import ml_collections
from absl import logging

from dvp_jax import config_checks, fileio, loop, report

STAGES = ("supervised", "moco", "linear", "finetune", "distill")
# stage -> (row label of Table 1, starts from Phase 1).
ROWS = {
    "supervised": ("Supervised from scratch", False),
    "moco": ("Phase 1 (k-NN on the frozen encoder)", False),
    "linear": ("Phase 1 + linear readout", True),
    "finetune": ("Phase 1 + finetune", True),
    "distill": ("Phase 1 + Phase 2 (ours)", True),
}


def stage_config(config, stage: str, seed: int, workdir: str) -> ml_collections.ConfigDict:
    """The trainer config of one stage: shared input/model/seed copied in, Phase 1 wired."""
    c = ml_collections.ConfigDict(config.stages[stage].to_dict())
    c.input = ml_collections.ConfigDict(config.input.to_dict())
    c.model = ml_collections.ConfigDict(config.model.to_dict())
    c.seed = seed
    phase1 = os.path.join(workdir, f"seed_{seed}", "moco", "checkpoints")
    if stage in ("linear", "finetune"):
        c.classify.init_checkpoint = phase1
    elif stage == "distill":
        c.distill.teacher_checkpoint = phase1
    return c


def _evaluate_stage(stage: str, stage_dir: str, splits, stage_cfg) -> dict:
    from dvp_jax import evaluate
    ckpt = os.path.join(stage_dir, "checkpoints")
    results = {}
    for split in splits:
        knn = stage == "moco"
        r = evaluate.evaluate_checkpoints(
            [ckpt], split=split, input_config=stage_cfg.input, knn=knn,
            knn_k=stage_cfg.knn.k if knn else 200,
            knn_temperature=stage_cfg.knn.temperature if knn else 0.1,
            batch_size=stage_cfg.batch_size)
        results[split] = r["knn_top1"] if stage == "moco" else r["top1"]
    return results


def run_stage(config, stage: str, seed: int, workdir: str) -> dict:
    """Trains (or resumes, or skips) one stage and returns {'val': top1, 'test': top1, ...}."""
    from dvp_jax import train as train_lib
    stage_dir = os.path.join(workdir, f"seed_{seed}", stage)
    done_path = os.path.join(stage_dir, "done.json")
    if os.path.exists(done_path):
        record = fileio.read_json(done_path)
        logging.info("seed %d · %s: finished earlier, skipped (%s).", seed, stage, done_path)
        return record
    c = stage_config(config, stage, seed, workdir)
    config_checks.validate(c)
    loop.set_stage_label(f"seed {seed} · {stage} · ")
    module = importlib.import_module(train_lib.TRAINERS[c.trainer])
    module.train(c, stage_dir, None)
    loop.set_stage_label("")
    accuracies = _evaluate_stage(stage, stage_dir, config.eval_splits, c)
    uses_phase1 = stage != "supervised"
    record = {"stage": stage, "seed": seed, "accuracy": accuracies,
              "pretrain_epochs": config.stages.moco.num_epochs if uses_phase1 else 0,
              "train_epochs": 0 if stage == "moco" else c.num_epochs,
              "workdir": stage_dir}
    if jax.process_index() == 0:
        fileio.write_json(done_path, record, sort_keys=False)
    return record


def train(config, workdir: str, mesh=None) -> dict:
    """Runs every stage for every seed, then writes and prints the results table."""
    loop.check_or_save_config(config, workdir)
    records = []
    for seed in config.seeds:
        for stage in STAGES:
            if stage in config.skip_stages:
                continue
            records.append(run_stage(config, stage, seed, workdir))
    results = report.summarise(records, ROWS, config.eval_splits)
    if jax.process_index() == 0:
        report.write_all(results, records, workdir)
        print(report.markdown_table(results, config.eval_splits), flush=True)
    return results

