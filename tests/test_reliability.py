"""Faults: SIGKILL (also during a save), SIGTERM, NaN, a foreign workdir, bad command lines.

The subprocess runs use the CLI exactly as a user would; the persistent compilation cache
(tests/conftest.py) lets them reuse the programs the in-process runs compiled.
"""
import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import moco as moco_configs
from dvp_jax import checkpoints, loop, sharding, train, workdir_config
from dvp_jax.trainers import moco
from helpers import REPO  # noqa: E402

OVERRIDES = {"num_epochs": 4.0, "loop.checkpoint_every_steps": 2, "loop.log_every_steps": 1,
             "knn.enabled": False}  # 16 steps of 16 synthetic 16-px images.


def config():
    c = moco_configs.get_config("runlocal")
    for key, value in OVERRIDES.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def cli(workdir, *extra):
    args = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    return [sys.executable, "-m", "dvp_jax.main", "--config=configs/moco.py:runlocal",
            f"--workdir={workdir}", *args, *extra]


def start(workdir, *extra):
    return subprocess.Popen(cli(workdir, *extra), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def last_logged_step(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        steps = [json.loads(line)["step"] for line in f if line.strip().endswith("}")]
    return max(steps, default=0)


def wait_for(predicate, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return False


def final_state(workdir):
    _, state, step = checkpoints.load_raw(os.path.join(workdir, "checkpoints"))
    return state, step


def assert_states_equal(a, b):
    for name in ("params", "batch_stats", "key_params", "queue", "queue_ptr", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, a[name], b[name])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    train.train_and_evaluate(config(), workdir)
    return (*final_state(workdir), workdir)


def test_sigkill_during_a_save_then_resume_is_bitwise_equal(uninterrupted, tmp_path):
    """SIGKILL lands after step 5, inside the checkpoint save of step 6 when the test sees it
    under way (else a few steps later). Step 5 > the first save (step 2): a complete
    checkpoint exists to resume from (a kill inside the very first save leaves none, and the
    rerun starts from scratch)."""
    kill_after = 5
    workdir = str(tmp_path / "killed")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    saving = lambda: os.path.isdir(ckpt_dir) and any("tmp" in n for n in os.listdir(ckpt_dir))
    proc = start(workdir)
    ready = wait_for(lambda: last_logged_step(workdir) >= kill_after and
                     (saving() or last_logged_step(workdir) >= kill_after + 3), proc)
    assert ready, proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    print(f"killed after step {last_logged_step(workdir)}; inside a save: {saving()}")
    # An unfinished save is never taken for a checkpoint: the latest complete one loads,
    # and at most one checkpoint interval (2 steps) is lost.
    meta, _, step = checkpoints.load_raw(ckpt_dir)
    assert meta["trainer"] == "moco" and step % 2 == 0
    assert step >= last_logged_step(workdir) - 2
    train.train_and_evaluate(config(), workdir)  # The same command again resumes.
    state, final = final_state(workdir)
    assert final == 16
    assert_states_equal(uninterrupted[0], state)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(uninterrupted, tmp_path):
    workdir = str(tmp_path / "preempted")
    proc = start(workdir)
    assert wait_for(lambda: last_logged_step(workdir) >= 5, proc), proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    step = checkpoints.latest_step(os.path.join(workdir, "checkpoints"))
    assert 5 <= step < 16 and step == last_logged_step(workdir)  # Saved where it stopped.
    train.train_and_evaluate(config(), workdir)
    state, final = final_state(workdir)
    assert final == 16
    assert_states_equal(uninterrupted[0], state)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    c = config()
    mesh = sharding.make_mesh()
    task = moco.build_task(c, mesh)

    def poisoned_step(state, batch):
        new_state, metrics = task.train_step(state, batch)
        bad = jax.numpy.where(state["step"] >= 5, jax.numpy.nan, 1.0)  # Step 6 goes bad.
        new_state = dict(new_state, params=jax.tree.map(lambda p: p * bad, new_state["params"]))
        return new_state, dict(metrics, loss=metrics["loss"] * bad)

    workdir = str(tmp_path / "nan")
    with pytest.raises(loop.NonFiniteError, match=r"metric 'loss' is not finite at step 6"):
        loop.run(dataclasses.replace(task, train_step=poisoned_step), c, workdir, mesh)
    meta, state, step = checkpoints.load_raw(os.path.join(workdir, "checkpoints"))
    assert step == 4  # Saved at 2 and 4; the bad step 6 was never written.
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_a_workdir_of_another_config_is_refused(tmp_path):
    workdir = str(tmp_path / "w")
    workdir_config.check_or_save_config(config(), workdir)
    other = config()
    other.moco.margin = 0.0
    other.batch_size = 32
    with pytest.raises(workdir_config.ConfigMismatchError) as e:
        workdir_config.check_or_save_config(other, workdir)
    assert "moco.margin: saved 0.4, now 0.0" in str(e.value)
    assert "batch_size: saved 16, now 32" in str(e.value)
    other.loop.allow_config_change = True
    workdir_config.check_or_save_config(other, workdir)  # The explicit override resumes anyway.


@pytest.mark.parametrize("override, message", [
    ("--config.model.nmae=resnet18", 'Did you mean "name"'),
    ("--config.batch_size=abc", "invalid literal for int()"),
    ("--config.batch_size=2", "is not divisible by the 4 devices"),
    ("--config.input.source=folder:/no/such/folder", "/no/such/folder"),
])
def test_bad_command_lines_get_one_clear_line(override, message, tmp_path):
    proc = subprocess.run(cli(str(tmp_path / "w"), override), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    error_lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert error_lines and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- issue 15


def run_cli(workdir, *extra, timeout=300, prefix=()):
    """The CLI in a new process; ``prefix`` replaces ``python -m dvp_jax.main``."""
    argv = cli(workdir, *extra)
    argv = [*prefix, *argv[3:]] if prefix else argv
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def one_error_line(proc):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_sigint_saves_then_a_fresh_process_resumes_bitwise(uninterrupted, tmp_path):
    """Ctrl-C (SIGINT) = SIGTERM: checkpoint of the current step, exit preemption.EXIT_CODE.
    The resume runs in a NEW process (not this one, which trained before) and ends bit for
    bit where the uninterrupted run ends (same 4-device topology)."""
    from dvp_jax import preemption
    workdir = str(tmp_path / "ctrl_c")
    proc = start(workdir)
    assert wait_for(lambda: last_logged_step(workdir) >= 3, proc), proc.communicate()[0]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == preemption.EXIT_CODE, out[-3000:]
    assert "preempted: stopped by SIGINT" in out and "Traceback" not in out, out[-3000:]
    step = checkpoints.latest_step(os.path.join(workdir, "checkpoints"))
    assert 3 <= step < 16 and step == last_logged_step(workdir)
    resumed = run_cli(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {step}" in resumed.stderr
    state, final = final_state(workdir)
    assert final == 16
    assert_states_equal(uninterrupted[0], state)


def test_a_second_run_on_the_same_workdir_is_refused_and_a_killed_runs_lock_is_not_stale(tmp_path):
    from dvp_jax import workdir_lock
    workdir = str(tmp_path / "shared")
    first = start(workdir)
    try:
        assert wait_for(lambda: last_logged_step(workdir) >= 1, first), first.communicate()[0]
        second = run_cli(workdir)
        line = one_error_line(second)
        assert f"in use by another run: pid {first.pid} on host" in line, line
        assert "started 20" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with workdir_lock.hold(workdir):  # The kernel dropped the killed run's lock.
        pass


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes(uninterrupted, tmp_path):
    """The files of the latest checkpoint emptied (or one removed), as an interrupted copy or
    a full disk leaves them: the rerun reports it, moves it to checkpoints_damaged/ (nothing
    deleted) and resumes from the newest intact checkpoint, ending bit for bit where the
    uninterrupted run ends."""
    import shutil
    workdir = str(tmp_path / "damaged")
    shutil.copytree(uninterrupted[2], workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
    assert steps[-2:] == [14, 16]
    sizes = {}
    for root, _, files in os.walk(os.path.join(ckpt_dir, "16")):
        for name in files:
            path = os.path.join(root, name)
            sizes[os.path.relpath(path, ckpt_dir)] = 0
            open(path, "w").close()  # Truncated to 0 bytes.
    os.remove(os.path.join(ckpt_dir, "14", "state", "_METADATA"))  # 14: a file missing.
    proc = run_cli(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "Checkpoint" in proc.stderr and "is damaged" in proc.stderr
    assert "resuming from step 12" in proc.stderr
    damaged = sorted(os.listdir(os.path.join(workdir, "checkpoints_damaged")))
    assert [d.split(".")[0] for d in damaged] == ["14", "16"]
    kept = {os.path.relpath(os.path.join(r, n), os.path.join(workdir, "checkpoints_damaged"))
            for r, _, fs in os.walk(os.path.join(workdir, "checkpoints_damaged")) for n in fs}
    assert len(kept) >= len(sizes)  # Every damaged file is still there.
    state, final = final_state(workdir)
    assert final == 16
    assert_states_equal(uninterrupted[0], state)


# What TensorStore (under Orbax) raises on a full disk (seen on a 6 MB tmpfs) or a read-only
# file system: the OS error text and code inside a ValueError.
DISK_ERROR = """
import sys
import orbax.checkpoint as ocp
real = ocp.CheckpointManager.save
def save(self, step, *a, **k):
    if step >= 6:
        raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: Failed to write 36935 "
                         "bytes to file 19: {text} [os_error_code='{code}']")
    return real(self, step, *a, **k)
ocp.CheckpointManager.save = save
from absl import app
from dvp_jax import main
sys.argv = ["dvp_jax.main"] + sys.argv[1:]
app.run(main.main, flags_parser=main.parse_flags)
"""


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["disk_full", "read_only"])
def test_a_disk_error_during_a_save_stops_clearly_and_keeps_the_previous_checkpoint(code,
                                                                                     tmp_path):
    """ENOSPC / EROFS injected into the checkpoint save of step 6 of a real CLI run, in the
    form TensorStore raises it (a run on a real 6 MB tmpfs got the same error and message)."""
    workdir = str(tmp_path / "disk")
    script = DISK_ERROR.replace("{text}", os.strerror(code)).replace("{code}", str(code))
    proc = run_cli(workdir, prefix=(sys.executable, "-c", script))
    line = one_error_line(proc)
    assert os.strerror(code) in line and "step 6" in line, line
    assert "previous checkpoint (step 4) is intact" in line, line
    meta, _, step = checkpoints.load_raw(os.path.join(workdir, "checkpoints"))
    assert step == 4 and meta["trainer"] == "moco"


def test_damaged_workdir_files_give_one_clear_line(tmp_path):
    """A truncated config.json (written whole since; here damaged by hand) -> one error line
    naming the file, exit 2; a torn last metrics.jsonl line is skipped and then cut."""
    from dvp_jax import fileio
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"batch_size": 1')
    line = one_error_line(run_cli(str(workdir)))
    assert "config.json is damaged" in line and "mv " in line, line
    path = str(workdir / "metrics.jsonl")
    with open(path, "w") as f:
        f.write('{"step": 1}\n{"step": 2}\n{"st')
    assert fileio.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    fileio.append_line(path, '{"step": 3}')
    assert fileio.read_jsonl(path) == [{"step": 1}, {"step": 2}, {"step": 3}]
    with open(path, "a") as f:
        f.write('{"bad\n{"step": 4}\n')
    with pytest.raises(fileio.WorkdirFileError, match="line 4 is damaged"):
        fileio.read_jsonl(path)


def test_an_interrupted_write_leaves_the_old_file(tmp_path):
    from dvp_jax import fileio
    path = str(tmp_path / "results.json")
    fileio.write_json(path, {"old": 1})

    def half_then_die(f):
        f.write('{"new": ')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        fileio.write_atomic(path, half_then_die)
    assert fileio.read_json(path) == {"old": 1}
    assert os.listdir(tmp_path) == ["results.json"]  # No temp file left behind.


def test_a_stop_signal_during_evaluation_saves_that_step_and_exits(tmp_path):
    """SIGTERM while an evaluator runs: the evaluation stops at once, the state of that step is
    checkpointed, Preempted (exit code preemption.EXIT_CODE) is raised."""
    from dvp_jax import preemption
    c = config()
    c.num_epochs = 1.0  # 4 steps.
    mesh = sharding.make_mesh()
    task = moco.build_task(c, mesh)
    finished = []

    def evaluator(state):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # Interrupted by the signal.
        finished.append(True)
        return {"x": 1.0}

    task = dataclasses.replace(task, evaluators=[evaluator], eval_every_steps=3)
    with pytest.raises(preemption.Preempted) as e:
        loop.run(task, c, str(tmp_path / "w"), mesh)
    assert e.value.step == 3 and e.value.code == preemption.EXIT_CODE and not finished
    assert checkpoints.latest_step(str(tmp_path / "w" / "checkpoints")) == 3
    with preemption.installed():  # Outside training (between stages): raised at once.
        with pytest.raises(preemption.Preempted):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
