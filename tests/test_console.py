"""What a user sees: a quiet console, --help exiting 0, rounded JSON, readable plots.

The end-to-end test runs the README's command line on the ``runlocal`` pipeline preset (one
stage, to stay short) in a subprocess with pipes (not a terminal), exactly as a scheduler or
CI would, and reads its console and WORKDIR/log.txt.
"""
import io
import json
import logging
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from dvp_jax import console, jsonfmt, plots
from helpers import REPO  # noqa: E402

# Lines that must never reach the console by default: absl-prefixed log lines (I1203 23:04:08
# ... file.py:12]), Orbax's and TensorFlow's notices.
FOREIGN = re.compile(r"^[IWEF]\d{4} |orbax|checkpoint_manager|oneDNN|absl::InitializeLog|"
                     r"^INFO|^WARNING", re.IGNORECASE)


def _env():
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # What a user has: nothing set.
    return env


@pytest.mark.parametrize("module", ["dvp_jax.main", "dvp_jax.evaluate", "dvp_jax.convert_torch",
                                    "dvp_jax.benchmark", "dvp_jax.input.vipriors"])
def test_help_exits_0_and_prints_usage(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env=_env())
    assert r.returncode == 0, (r.returncode, r.stdout[-1000:], r.stderr[-1000:])
    assert "usage" in r.stdout.lower() or "python -m" in r.stdout, r.stdout[:500]
    assert "Traceback" not in r.stderr


def test_main_help_lists_its_own_flags():
    r = subprocess.run([sys.executable, "-m", "dvp_jax.main", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0
    for flag in ("--config", "--workdir"):
        assert flag in r.stdout


@pytest.fixture(scope="module")
def runlocal(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("console") / "run")
    override = "--config.skip_stages=('moco','linear','finetune','distill')"
    r = subprocess.run([sys.executable, "-m", "dvp_jax.main",
                        "--config=configs/table1.py:runlocal", f"--workdir={workdir}",
                        override], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=_env())
    return r, workdir


def test_runlocal_console_is_quiet_with_progress_and_table(runlocal):
    r, workdir = runlocal
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (r.stderr + r.stdout).splitlines()
    foreign = [line for line in lines if FOREIGN.search(line)]
    assert not foreign, foreign[:5]
    assert lines[0].startswith("dvp_jax: Table 1"), lines[:3]
    assert any(line.strip().startswith("devices:") for line in lines[:6])
    # The progress (non-TTY: plain lines) reaches the last step with every field.
    progress = [line for line in lines if re.match(
        r"seed 0 · supervised\s+step 8/8\s+epoch 2\.00\s+loss \S+\s+lr \S+\s+img/s \d+\s+ETA "
        r"\d:\d\d:\d\d$", line)]
    assert progress, lines
    assert any(re.match(r"seed 0 · supervised: val top-1 \d+\.\d\d  test top-1 \d+\.\d\d$", line)
               for line in lines)
    # The final table on stdout.
    header = "| method | pretrain epochs | train epochs | val top-1 (%) final | test top-1 (%) final |"
    assert header in r.stdout
    assert "| Supervised from scratch |" in r.stdout
    assert len(lines) < 20, lines


def test_runlocal_log_file_has_everything(runlocal):
    r, workdir = runlocal
    with open(os.path.join(workdir, "log.txt")) as f:
        log = f.read()
    from configs import table1 as table1_configs
    config = table1_configs.get_config("runlocal")
    config.skip_stages = ("moco", "linear", "finetune", "distill")
    assert str(config) in log  # The full config, as YAML.
    assert "checkpoint_manager" in log  # Orbax's lines are kept here, not on the console.
    assert re.search(r"seed 0 · supervised step 8/8 epoch 2\.00 .*ce=.*grad_norm=", log)


def test_tensorboard_gets_the_logged_scalars(runlocal):
    """Every scalar of metrics.jsonl is a TensorBoard tag of the same stage, same values."""
    _, workdir = runlocal
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util
    stage_dir = os.path.join(workdir, "seed_0", "supervised")
    acc = event_accumulator.EventAccumulator(stage_dir, size_guidance={"tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    rows = plots.read_jsonl(os.path.join(stage_dir, "metrics.jsonl"))
    for row in rows:
        keys = set(row) - {"kind", "step"} - ({"epoch"} if row["kind"] == "eval" else set())
        assert keys <= tags, keys - tags
        for key in keys:
            events = {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
                      for e in acc.Tensors(key)}
            assert events[row["step"]] == pytest.approx(row[key], rel=1e-5), key


def test_error_is_one_line_at_the_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dvp_jax.main",
                        "--config=configs/table1.py:runlocal", f"--workdir={tmp_path}",
                        "--config.input.source=folder:/nonexistent_dvp_jax_dir"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), lines[-5:]
    assert "Traceback" not in r.stderr
    assert not [line for line in lines if FOREIGN.search(line)], lines


# ----------------------------------------------------------------------------- units


def test_json_rounding():
    assert jsonfmt.round_float(85.00000238418579) == 85.0
    assert jsonfmt.round_float(3.4375e-05) == 3.4375e-05
    assert jsonfmt.round_float(0.1234567891) == 0.123457
    assert math.isnan(jsonfmt.round_float(float("nan")))
    got = json.loads(jsonfmt.dumps({"top1": np.float32(85.0000024), "n": 7, "ok": True,
                                    "per_seed": [83.33333333333333, np.float64(1 / 3)],
                                    "name": "val"}))
    assert got == {"top1": 85.0, "n": 7, "ok": True, "per_seed": [83.3333, 0.333333],
                   "name": "val"}


def _record(name: str, level: int, pathname: str = "/elsewhere/lib.py") -> logging.LogRecord:
    return logging.LogRecord(name, level, pathname, 1, "message", None, None)


def test_console_filter_levels():
    default = console._ConsoleFilter(console.library_level(None))
    info = console._ConsoleFilter(console.library_level(0))
    ours = os.path.join(console.PACKAGE_DIR, "loop.py")
    assert default.filter(_record(console.CONSOLE_LOGGER, logging.INFO))
    assert not default.filter(_record("absl", logging.INFO))  # Orbax logs through absl.
    assert not default.filter(_record("jax._src.xla_bridge", logging.WARNING))
    assert default.filter(_record("absl", logging.WARNING, ours))  # dvp_jax's own warning.
    assert not default.filter(_record("absl", logging.INFO, ours))  # dvp_jax detail.
    assert default.filter(_record("orbax", logging.ERROR))
    assert info.filter(_record("absl", logging.INFO))
    file_only = _record(console.CONSOLE_LOGGER, logging.INFO)
    file_only.file_only = True
    assert not info.filter(file_only)


def test_progress_plain_lines_are_periodic():
    stream = io.StringIO()  # Not a terminal.
    p = console.Progress("stage", total_steps=10, stream=stream, interval_s=3600)
    for step in range(1, 11):
        p.update(step, epoch=step / 5, metrics={"loss": 1.0 / step, "lr": 1e-4},
                 steps_per_sec=2.0, images_per_sec=64.0)
    p.close()
    lines = stream.getvalue().splitlines()
    assert lines == [
        "stage  step 1/10  epoch 0.20  loss 1  lr 1.00e-04  img/s 64  ETA 0:00:04",
        "stage  step 10/10  epoch 2.00  loss 0.1  lr 1.00e-04  img/s 64  ETA 0:00:00"]


# ----------------------------------------------------------------------------- plots


def _fake_run(tmp_path, stage, seed, acc, offset):
    d = tmp_path / f"seed_{seed}" / stage
    d.mkdir(parents=True)
    rows = []
    for step in range(1, 11):
        m = {"loss": 7.0 - 0.3 * step + offset, "contrast_acc": 5.0 * step + offset} \
            if stage == "moco" else {"loss": 2.3 - 0.1 * step + offset, "ce": 2.3 - 0.1 * step}
        rows.append(dict(m, step=step, epoch=step / 2, kind="train"))
    key = "knn_top1" if stage == "moco" else "val_top1"
    rows += [{"step": 5, "kind": "eval", key: acc["val"] - 5},
             {"step": 10, "kind": "eval", key: acc["val"]}]  # No 'epoch': older files.
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{bad")
    return {"stage": stage, "seed": seed, "accuracy": acc, "workdir": str(d)}


def test_paired_differences_and_band():
    records = [{"stage": "distill", "seed": s, "accuracy": {"val": 80.0 + s}} for s in (0, 1)]
    records += [{"stage": "finetune", "seed": s, "accuracy": {"val": 79.0 + 3 * s}}
                for s in (0, 1, 2)]  # Seed 2 has no partner and is left out.
    assert plots.paired_differences(records, "val") == {"finetune": {0: 1.0, 1: -1.0}}
    x, mean, std = plots.seed_band([{0.5: 1.0, 1.0: 3.0}, {0.5: 3.0, 1.0: 5.0, 1.5: 9.0}])
    np.testing.assert_allclose(x, [0.5, 1.0])
    np.testing.assert_allclose(mean, [2.0, 4.0])
    np.testing.assert_allclose(std, [1.0, 1.0])


def test_plots_write_pngs(tmp_path):
    records = []
    for seed in (0, 1, 2):
        for i, stage in enumerate(("supervised", "moco", "linear", "finetune", "distill")):
            acc = {"val": 60.0 + 5 * i + seed, "test": 58.0 + 5 * i - seed}
            records.append(_fake_run(tmp_path, stage, seed, acc, offset=0.1 * seed))
    for name, draw in (("curves.png", lambda p: plots.plot_curves(records, p)),
                       ("accuracy.png", lambda p: plots.plot_accuracy(records, ["val", "test"], p))):
        path = str(tmp_path / name)
        draw(path)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
