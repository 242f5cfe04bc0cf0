"""The main job end to end on tiny synthetic data: every artefact, and a rerun skips."""
import json
import os
import time

import pytest

from configs import pipeline as pipeline_configs
from dvp_jax import jsonfmt, pipeline, train

STAGES = ("supervised", "moco", "linear", "finetune", "distill")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pipeline"))
    config = pipeline_configs.get_config("runlocal")
    results = train.train_and_evaluate(config, workdir)
    return workdir, config, results


def test_every_artefact_exists_and_is_well_formed(finished):
    workdir, config, results = finished
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    assert [r["stage"] for r in saved["rows"]] == list(STAGES)
    for row in saved["rows"]:
        for split in ("val", "test"):
            assert 0.0 <= row[split]["mean"] <= 100.0
            assert len(row[split]["per_seed"]) == len(config.seeds)
    assert saved["rows"] == jsonfmt.rounded(results)  # Floats to 6 significant digits.
    table = open(os.path.join(workdir, "results.md")).read()
    for label, _ in pipeline.ROWS.values():
        assert label in table
    assert "val top-1 (%)" in table and "±" in table
    for png in ("curves.png", "accuracy.png"):
        with open(os.path.join(workdir, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for stage in STAGES:
        stage_dir = os.path.join(workdir, "seed_0", stage)
        assert os.path.exists(os.path.join(stage_dir, "done.json"))
        assert any(n.startswith("events.out.tfevents") for n in os.listdir(stage_dir))
        assert os.path.isdir(os.path.join(stage_dir, "checkpoints"))


def test_a_rerun_skips_finished_stages(finished):
    workdir, config, results = finished
    stamps = {s: os.path.getmtime(os.path.join(workdir, "seed_0", s, "done.json")) for s in STAGES}
    t0 = time.time()
    again = train.train_and_evaluate(config, workdir)
    assert again == results
    assert time.time() - t0 < 30  # No training, no evaluation: only the report is rewritten.
    for s in STAGES:
        assert os.path.getmtime(os.path.join(workdir, "seed_0", s, "done.json")) == stamps[s]


def test_an_interrupted_stage_resumes(finished, tmp_path):
    """A stage without done.json (killed mid-way) is trained on from its checkpoints."""
    import shutil
    workdir, config, _ = finished
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    os.remove(os.path.join(copy, "seed_0", "distill", "done.json"))
    results = train.train_and_evaluate(config, copy)
    assert os.path.exists(os.path.join(copy, "seed_0", "distill", "done.json"))
    assert [r["stage"] for r in results] == list(STAGES)
