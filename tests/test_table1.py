"""The main job end to end on tiny synthetic data: every artefact, and a rerun skips."""
import json
import os
import time

import numpy as np
import pytest

from configs import table1 as table1_configs
from dvp_jax import jsonfmt, table1, workdir_config

STAGES = ("supervised", "random", "moco", "linear", "finetune", "distill")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pipeline"))
    config = table1_configs.get_config("runlocal")
    results = table1.run(config, workdir)
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
    for label, _ in table1.ROWS.values():
        assert label in table
    assert "val top-1 (%) final" in table and "±" in table
    assert "best val epoch (reference protocol)" in table
    for row in saved["rows"]:  # The reference's protocol beside the final epoch (not k-NN).
        if row["stage"] in table1.KNN_STAGES:
            assert "best_val_epoch" not in row
        else:
            assert row["best_val_epoch"]["split"] == "val"
            assert 0.0 <= row["best_val_epoch"]["mean"] <= 100.0
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
    again = table1.run(config, workdir)
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
    results = table1.run(config, copy)
    assert os.path.exists(os.path.join(copy, "seed_0", "distill", "done.json"))
    assert [r["stage"] for r in results] == list(STAGES)


def test_top_level_loop_overrides_reach_every_stage():
    config = table1_configs.get_config("runlocal")
    own = {s: table1.stage_config(config, s, 0, "/w").loop.to_dict() for s in STAGES}
    random_stage = table1.random_init_config(config.stages.moco, config.random_init_bn_epochs)
    stage_own = {s: random_stage if s == "random" else config.stages[s] for s in STAGES}
    assert all(own[s] == stage_own[s].loop.to_dict() for s in STAGES)  # Unset: stage's own.
    config.loop.checkpoint_every_steps = 7
    config.loop.allow_config_change = True
    for s in STAGES:
        c = table1.stage_config(config, s, 0, "/w")
        assert c.loop.checkpoint_every_steps == 7 and c.loop.allow_config_change
        assert c.loop.log_every_steps == own[s]["log_every_steps"]


def test_a_finished_stage_with_a_changed_config_is_not_skipped(tmp_path):
    config = table1_configs.get_config("runlocal")
    c = table1.stage_config(config, "linear", 0, str(tmp_path))
    stage_dir = str(tmp_path / "seed_0" / "linear")
    os.makedirs(stage_dir)
    record = {"stage": "linear", "accuracy": {"val": 50.0}}
    json.dump(record, open(os.path.join(stage_dir, "done.json"), "w"))
    assert table1.finished_record(stage_dir, c) is None  # No saved config: cannot tell.
    json.dump(workdir_config.config_to_dict(c), open(os.path.join(stage_dir, "config.json"), "w"))
    assert table1.finished_record(stage_dir, c) == record
    c.loop.log_every_steps = 3  # A change the loop resumes with: still finished.
    assert table1.finished_record(stage_dir, c) == record
    c.optim.base_lr = c.optim.base_lr * 2  # A result-changing change: run again.
    assert table1.finished_record(stage_dir, c) is None


def test_results_md_equals_the_per_stage_results(finished):
    """Every cell of results.md (mean ± sample std, ddof = 1) and every paired difference with
    its 95% t-interval is recomputed here from the stages' own done.json files."""
    from scipy import stats
    workdir, config, _ = finished
    done = {}
    for seed in config.seeds:
        for stage in STAGES:
            with open(os.path.join(workdir, f"seed_{seed}", stage, "done.json")) as f:
                done[(stage, seed)] = json.load(f)["accuracy"]
    table = open(os.path.join(workdir, "results.md")).read()
    assert "sample std (ddof = 1)" in table
    for stage in STAGES:
        label = table1.ROWS[stage][0]
        line = next(l for l in table.splitlines() if l.startswith(f"| {label} |"))
        for split in config.eval_splits:
            v = np.array([done[(stage, s)][split] for s in config.seeds])
            std = v.std(ddof=1) if len(v) > 1 else 0.0
            assert f"{v.mean():.1f} ± {std:.1f}" in line
    for label, a, b in table1.PAIRS:
        line = next(l for l in table.splitlines() if l.startswith(f"| {label} |"))
        for split in config.eval_splits:
            d = np.array([done[(a, s)][split] - done[(b, s)][split] for s in config.seeds])
            assert f"{d.mean():+.1f}" in line
            if len(d) > 1:
                half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
                assert f"[{d.mean() - half:+.1f}, {d.mean() + half:+.1f}]" in line


def test_paired_intervals_and_readme_section(tmp_path):
    """t-intervals against numbers worked by hand, and the README section rewrite."""
    from dvp_jax import report
    # d = [1, 2, 3]: mean 2, sd 1, t(0.975, 2) = 4.302653 -> 2 ± 2.484138.
    mean, low, high = report.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and np.isclose(low, 2 - 2.484138, atol=1e-5)
    assert np.isclose(high, 2 + 2.484138, atol=1e-5)
    records = [{"stage": st, "seed": s, "accuracy": {"val": acc}, "pretrain_epochs": 0,
                "train_epochs": 0} for st, s, acc in
               [("a", 0, 50.0), ("a", 1, 52.0), ("a", 2, 55.0),
                ("b", 0, 49.0), ("b", 1, 50.0), ("b", 2, 52.0)]]
    (p,) = report.paired_differences(records, [("a - b", "a", "b")], ["val"])
    assert p["val"]["per_seed"] == [1.0, 2.0, 3.0] and not p["val"]["significant"]
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:x -->\nold\n<!-- /results:x -->\nend\n")
    results = tmp_path / "results.json"
    rows = report.summarise(records, {"a": ("A", False), "b": ("B", False)}, ["val"])
    results.write_text(json.dumps({"rows": rows, "paired": [p]}))
    assert report.main([str(results), "--readme", str(readme), "--section", "x"]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n<!-- results:x -->\n| method") and text.endswith(
        "<!-- /results:x -->\nend\n")
    assert "old" not in text and "| A | - | - | 52.3 ± 2.5 |" in text
    assert "| a - b | +2.0 [-0.5, +4.5] |" in text
    assert report.main([str(results), "--readme", str(readme), "--section", "missing"]) == 2
