"""Multi-host: 2 processes x 2 CPU devices (gloo collectives on 127.0.0.1) vs 1 process x 4.

The 2-process runs use the command line exactly as on a cluster
(``python -m dvp_jax.main ... --cpu_collectives=gloo --coordinator_address=127.0.0.1:PORT
--num_processes=2 --process_id=I``), each process with XLA_FLAGS=...device_count=2; the
1-process reference runs inside this pytest process (4 devices, tests/conftest.py) on the same
global batches (the indexed synthetic source gives every process count the same global batch).

Runs (module fixture ``runs``, each happens once; 2-process jobs overlap with in-process work):
  moco_1p     configs/moco.py:runlocal, 8 steps, checkpoints 4 and 8         (in-process)
  moco_2p     the same in 2 processes                                        (job)
  resume_2p   moco_1p's step-4 checkpoint resumed to 8 in 2 processes        (job)
  resume_1p   moco_2p's step-4 checkpoint resumed to 8 in 1 process          (in-process)
  indices     tests/multihost_worker.py: each process's share of 3 batches   (job)
  distill_1p / distill_2p  configs/distill.py:runlocal, 4 steps, teacher = moco_1p

Tolerances (1 x 4 and 2 x 2 run the same partitioned program; only the collectives differ:
XLA:CPU's in-process all-reduce and gloo sum the 4 device shards in different orders).
  MoCo (BN statistics per device group, so only the gradient all-reduce crosses devices):
  integers (step, queue_ptr, rng) exact; each float tree (params, BN statistics, key encoder,
  queue, SGD momentum buffers) within KINK_FRACTION = 10% of how far training moved it
  (relative L2 norm of the difference). Why not elementwise: a last-bit difference can flip a
  ReLU whose input is within ~1e-7 of 0, and the gradient then jumps. Measured (AMD EPYC):
  the 2-process step-4 checkpoint resumed in 1 process (fresh process or not) gets a step-8
  gradient norm of 11.4070 instead of 11.2455; the same jump follows from multiplying the
  1-process step-7 params by (1 + 1e-7 N(0,1)) (3 of 6 draws flip; the gradients differ from
  layer2_1's output ReLU down, layers 3-4 agree to 1e-6). That flip moves the momentum
  buffers by 3.1% of their step 4 -> 8 change, the params by 0.12%; a restore that loses the
  momentum buffers (zeros) moves them by 68%, one on the wrong batches moves the queue by
  ~100%. Without a flip the runs agree to ~1e-7 (params) and 4e-6 (momentum buffers).
  Distillation (the student's BN is global: its batch statistics are all-reduced in the
  forward pass too): a last-bit difference can flip the sign of a pre-ReLU activation and so
  change a gradient element discretely (seen in one process: 1e-3 relative in early-layer
  gradients at one step between meshes of 4 and of 2 or 1 devices). So: the frozen
  teacher bit for bit; step-1 loss / ce / distill / top1 (same student, same batch) rtol 1e-5;
  final student params and BN statistics atol 2e-3 (observed 6.5e-6 to 3.2e-4, depending on
  whether and when a ReLU flips; the params move 2e-2 in those 4 steps); later steps' loss /
  ce / distill rtol 2e-3 (observed <= 3.2e-4).
The tests also check that training moved the compared values far more than the tolerance,
so a wrong batch share or a wrong restore cannot pass.
"""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback

import jax
import numpy as np
import pytest

from configs import distill as distill_configs
from configs import moco as moco_configs
from dvp_jax import checkpoints, train, workdir_lock
from helpers import REPO, free_port, two_device_env  # noqa: E402
from multihost_worker import START_STEP, STEPS as WORKER_STEPS

TIMEOUT = 300  # Seconds for one 2-process job (60-130 s on 2 busy cores, warm cache).
# runlocal: 64 synthetic 16-px images, batch 16 -> 4 steps per epoch, 2 epochs = 8 steps.
MOCO = {"knn.enabled": False, "loop.log_every_steps": 1, "loop.checkpoint_every_steps": 4}
MOCO_STEPS = 8
DISTILL = {"loop.log_every_steps": 1, "num_epochs": 1.0}  # 4 steps, one checkpoint.
DISTILL_STEPS = 4
MOCO_RTOL, MOCO_ATOL = 1e-5, 2e-5  # Metrics of the same step (loss is continuous).
MOCO_METRICS_RTOL = 1e-3  # Logged loss etc.; grad_norm not compared (it jumps at a ReLU flip).
KINK_FRACTION = 0.1  # Float trees: |a - b| <= 10% of |b - start| (module docstring).
DISTILL_ATOL = 2e-3
DISTILL_RTOL_METRICS = 2e-3  # loss, ce, distill after step 1.
NOT_COMPARED = ("steps_per_sec", "images_per_sec")  # Timings in metrics.jsonl.


# ----------------------------------------------------------------------------- configs


def _override(config, overrides):
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return config


def moco_config():
    return _override(moco_configs.get_config("runlocal"), MOCO)


def distill_overrides(teacher):
    return dict(DISTILL, **{"distill.teacher_checkpoint": teacher})


def distill_config(teacher):
    return _override(distill_configs.get_config("runlocal"), distill_overrides(teacher))


def cli(config_arg, workdir, overrides):
    """argv of process i of a 2-process run: (coordinator address, i) -> list."""
    args = [f"--config.{k}={v}" for k, v in overrides.items()]
    return lambda address, i: [
        sys.executable, "-X", "faulthandler", "-m", "dvp_jax.main", f"--config={config_arg}",
        f"--workdir={workdir}", *args, "--cpu_collectives=gloo",
        f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"]


# ----------------------------------------------------------------------------- 2-process jobs


class Job:
    """Both processes of one jax.distributed job on 127.0.0.1, started at once.

    Output goes to files (orbax logs would fill a pipe). ``wait`` returns both outputs once
    both exit 0; if one fails or the job outlives TIMEOUT, both are killed and the test fails
    with the tail of each output.
    """

    def __init__(self, name, argv_for, logdir):
        self.name, self.t0, self.outputs = name, time.time(), None
        address = f"127.0.0.1:{free_port()}"
        self.paths = [os.path.join(logdir, f"{name}.{i}.log") for i in range(2)]
        self.procs = []
        for i, path in enumerate(self.paths):
            with open(path, "w") as log:
                self.procs.append(subprocess.Popen(
                    argv_for(address, i), cwd=REPO, env=two_device_env(), stdout=log,
                    stderr=subprocess.STDOUT))

    def _read(self, i):
        with open(self.paths[i], errors="replace") as f:
            return f.read()

    def _fail(self, why):
        for p in self.procs:  # -X faulthandler: Python stacks of every thread into the log.
            if p.poll() is None:
                p.send_signal(signal.SIGABRT)
        time.sleep(3)
        self.kill()
        tails = "\n".join(f"----- {self.name} process {i} (rc {p.returncode}) -----\n"
                          f"{self._read(i)[-8000:]}" for i, p in enumerate(self.procs))
        pytest.fail(f"2-process job {self.name!r} {why}\n{tails}", pytrace=False)

    def wait(self) -> list[str]:
        while self.outputs is None:
            codes = [p.poll() for p in self.procs]
            if any(c not in (None, 0) for c in codes):
                self._fail("failed")
            if all(c == 0 for c in codes):
                self.outputs = [self._read(i) for i in range(2)]
            elif time.time() - self.t0 > TIMEOUT:
                self._fail(f"did not finish in {TIMEOUT} s")
            else:
                time.sleep(0.2)
        return self.outputs

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


class Runs:
    """The module's runs: 2-process jobs and in-process results (or their exceptions)."""

    def __init__(self, root):
        self.root = root
        self.logdir = os.path.join(root, "logs")
        os.makedirs(self.logdir)
        self.jobs, self.local_results = {}, {}

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def start(self, name, argv_for):
        self.jobs[name] = Job(name, argv_for, self.logdir)

    def job(self, name) -> Job:
        if name not in self.jobs:
            pytest.fail(f"job {name!r} was not started: a run it needs failed "
                        f"({', '.join(k for k, v in self.local_results.items() if v[0])})")
        return self.jobs[name]

    def local(self, name, fn):
        """Runs fn now; a failure is kept and raised by ``get`` in the tests that need it."""
        try:
            self.local_results[name] = (None, fn())
        except (Exception, pytest.fail.Exception) as e:
            self.local_results[name] = (e, traceback.format_exc())

    def ok(self, name):
        return self.local_results[name][0] is None

    def get(self, name):
        if name not in self.local_results:
            pytest.fail(f"in-process run {name!r} did not run: a run it needs failed")
        error, value = self.local_results[name]
        if error is not None:
            pytest.fail(f"in-process run {name!r} failed:\n{value}", pytrace=False)
        return value

    def kill_all(self):
        for job in self.jobs.values():
            job.kill()


def keep_checkpoint(src, dst, step):
    """A copy of workdir ``src`` holding only its config and its step-``step`` checkpoint."""
    os.makedirs(os.path.join(dst, "checkpoints"))
    shutil.copy(os.path.join(src, "config.json"), dst)
    shutil.copytree(os.path.join(src, "checkpoints", str(step)),
                    os.path.join(dst, "checkpoints", str(step)))


def reference_batches(start_step, steps):
    """The global batches of steps start_step.. as 1 process reads them ('index', 'view1')."""
    from dvp_jax.input import pipeline
    c = moco_configs.get_config("runlocal")
    it = pipeline.make_train_iterator(
        c.input, c.input.train_split, "moco_v2", global_batch=c.batch_size, seed=c.seed,
        start_step=start_step, image_size=c.input.image_size, process_index=0, process_count=1)
    batches = [next(it) for _ in range(steps)]
    return {k: np.stack([b[k] for b in batches]) for k in ("index", "view1")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    r = Runs(str(tmp_path_factory.mktemp("multihost")))
    try:
        r.start("moco_2p", cli("configs/moco.py:runlocal", r.path("moco_2p"), MOCO))
        r.start("indices", lambda address, i: [
            sys.executable, "-X", "faulthandler",
            os.path.join(REPO, "tests", "multihost_worker.py"),
            f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}",
            f"--out={r.path(f'indices.{i}.npz')}"])
        r.local("moco_1p", lambda: train.train_and_evaluate(moco_config(), r.path("moco_1p")))
        teacher = r.path("moco_1p", "checkpoints")
        if r.ok("moco_1p"):
            keep_checkpoint(r.path("moco_1p"), r.path("resume_2p"), 4)
            r.start("resume_2p", cli("configs/moco.py:runlocal", r.path("resume_2p"), MOCO))
            r.start("distill_2p", cli("configs/distill.py:runlocal", r.path("distill_2p"),
                                      distill_overrides(teacher)))
            r.local("distill_1p", lambda: train.train_and_evaluate(distill_config(teacher),
                                                                   r.path("distill_1p")))
        r.local("reference_batches", lambda: reference_batches(START_STEP, WORKER_STEPS))

        def resume_1p():
            r.job("moco_2p").wait()
            keep_checkpoint(r.path("moco_2p"), r.path("resume_1p"), 4)
            train.train_and_evaluate(moco_config(), r.path("resume_1p"))

        r.local("resume_1p", resume_1p)
        yield r
    finally:
        r.kill_all()


# ----------------------------------------------------------------------------- helpers


def final_state(workdir, step=None):
    """(state as host numpy arrays, step) of a workdir's checkpoint, read in THIS process."""
    _, state, step = checkpoints.load_raw(os.path.join(workdir, "checkpoints"), step)
    return state, step


def _path_name(path) -> str:
    """'/'-joined names of a tree path, the same whether a node is a dict (a raw checkpoint
    read) or a namedtuple / dataclass (an optax state built in memory)."""
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey.
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
        else:
            names.append(str(entry))
    return "/".join(names)


def paths_and_leaves(tree):
    return {_path_name(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_close(a, b, *, rtol, atol, what):
    """Same tree; integer leaves equal, float leaves within rtol/atol."""
    la, lb = paths_and_leaves(a), paths_and_leaves(b)
    assert la.keys() == lb.keys(), what
    for k in la:
        if np.issubdtype(la[k].dtype, np.floating):
            np.testing.assert_allclose(la[k], lb[k], rtol=rtol, atol=atol, err_msg=f"{what}{k}")
        else:
            np.testing.assert_array_equal(la[k], lb[k], err_msg=f"{what}{k}")


def max_change(a, b) -> float:
    la, lb = paths_and_leaves(a), paths_and_leaves(b)
    return max(float(np.max(np.abs(la[k] - lb[k]))) for k in la if la[k].size)


def _norm(leaves) -> float:
    return float(np.sqrt(sum(np.sum(np.square(x.astype(np.float64))) for x in leaves)))


def assert_moco_states_close(state, reference, start, what):
    """Integer leaves equal; each float tree within KINK_FRACTION of its movement from
    ``start`` (the state both runs began from)."""
    for name in ("params", "batch_stats", "key_params", "key_batch_stats", "queue", "queue_ptr",
                 "opt_state", "step", "rng"):
        la, lb = paths_and_leaves(state[name]), paths_and_leaves(reference[name])
        ls = paths_and_leaves(start[name])
        assert la.keys() == lb.keys() == ls.keys(), f"{what}: {name}"
        floats = [k for k in la if np.issubdtype(la[k].dtype, np.floating)]
        for k in la:
            if k not in floats:
                np.testing.assert_array_equal(la[k], lb[k], err_msg=f"{what}: {name}{k}")
        if floats:
            diff = _norm([la[k] - lb[k] for k in floats])
            moved = _norm([lb[k] - ls[k] for k in floats])
            assert moved > 0 and diff <= KINK_FRACTION * moved, \
                f"{what}: {name} differs by {diff:.3g}, {diff / moved:.1%} of its change {moved:.3g}"


_INITIAL = {}


def initial_state():
    """The step-0 state of moco_config() (host numpy), computed once in this process."""
    if not _INITIAL:
        from dvp_jax import loop, sharding
        from dvp_jax.trainers import moco
        mesh = sharding.make_mesh()
        task = moco.build_task(moco_config(), mesh)
        _INITIAL["state"] = jax.device_get(loop.init_on_mesh(task.init_state, mesh,
                                                            moco_config().seed))
    return _INITIAL["state"]


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_metrics_close(records, reference, rtol, what, skip=()):
    """Per step, every logged value but the timings (and ``skip``) agrees (same steps, keys)."""
    assert [r["step"] for r in records] == [r["step"] for r in reference], what
    for got, want in zip(records, reference):
        assert got.keys() == want.keys(), what
        for k in got:
            if k in skip:
                continue
            if k in NOT_COMPARED or isinstance(got[k], str):
                assert k in NOT_COMPARED or got[k] == want[k], (what, k)
                continue
            np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=1e-6,
                                       err_msg=f"{what}: step {got['step']} {k}")


# A progress line, in WORKDIR/log.txt or on the console (dvp_jax/console.py).
PROGRESS = re.compile(r"(\w+)\s+step (\d+)/(\d+)\s+epoch")


# ----------------------------------------------------------------------------- tests


def test_two_processes_end_where_one_process_ends(runs):
    """2 x 2 devices vs 1 x 4 devices, 8 margin-MoCo steps: params, BN statistics, key
    encoder, queue, optimizer state and every logged metric agree (tolerance: docstring)."""
    runs.job("moco_2p").wait()
    runs.get("moco_1p")
    one, step1 = final_state(runs.path("moco_1p"))
    two, step2 = final_state(runs.path("moco_2p"))
    assert step1 == step2 == MOCO_STEPS and int(two["step"]) == MOCO_STEPS
    assert_moco_states_close(two, one, initial_state(), "2 processes vs 1")
    assert_metrics_close(read_metrics(runs.path("moco_2p")), read_metrics(runs.path("moco_1p")),
                         MOCO_METRICS_RTOL, "metrics.jsonl 2 processes vs 1", skip=("grad_norm",))
    # The tolerance is far below what training changes: 4 steps move the params 3e-3.
    mid, _ = final_state(runs.path("moco_1p"), 4)
    assert max_change(mid["params"], one["params"]) > 20 * MOCO_ATOL


def test_a_1_process_checkpoint_resumes_in_2_processes(runs):
    """moco_1p's step-4 checkpoint (written by 1 process on 4 devices) resumed by the
    2-process command ends where moco_1p ends."""
    p0, _ = runs.job("resume_2p").wait()
    assert "resuming from step 4" in p0
    workdir = runs.path("resume_2p")
    assert [r["step"] for r in read_metrics(workdir)] == list(range(5, MOCO_STEPS + 1))
    state, step = final_state(workdir)
    assert step == MOCO_STEPS
    assert_moco_states_close(state, final_state(runs.path("moco_1p"))[0],
                             final_state(runs.path("moco_1p"), 4)[0],
                             "1-process checkpoint resumed in 2 processes")


def test_a_2_process_checkpoint_resumes_in_1_process(runs):
    """moco_2p's checkpoints load in this (1-process) pytest process, and its step-4
    checkpoint resumed here ends where moco_1p ends."""
    runs.job("moco_2p").wait()
    runs.get("resume_1p")
    for step in (4, MOCO_STEPS):  # load_raw of checkpoints written by 2 processes.
        two, _ = final_state(runs.path("moco_2p"), step)
        one, _ = final_state(runs.path("moco_1p"), step)
        assert_moco_states_close(two, one, initial_state(),
                                 f"2-process checkpoint {step} loaded in 1 process")
    workdir = runs.path("resume_1p")
    assert [r["step"] for r in read_metrics(workdir)] == list(range(5, MOCO_STEPS + 1))
    state, step = final_state(workdir)
    assert step == MOCO_STEPS
    assert_moco_states_close(state, final_state(runs.path("moco_1p"))[0],
                             final_state(runs.path("moco_2p"), 4)[0],
                             "2-process checkpoint resumed in 1 process")


def test_each_process_reads_its_own_share_of_each_global_batch(runs):
    """pipeline.make_train_iterator with the default process index/count (jax.process_index
    after jax.distributed.initialize): the 2 shares are disjoint and, in process order, are
    exactly the 1-process global batch (indices and augmented views, bit for bit)."""
    runs.job("indices").wait()
    shares = [dict(np.load(runs.path(f"indices.{i}.npz"))) for i in range(2)]
    for i, share in enumerate(shares):
        assert (int(share["process_index"]), int(share["process_count"])) == (i, 2)
        assert (int(share["local_devices"]), int(share["devices"])) == (2, 4)
    start, steps = int(shares[0]["start_step"]), int(shares[0]["steps"])
    assert (start, steps) == (START_STEP, WORKER_STEPS)
    ref = runs.get("reference_batches")
    half = ref["index"].shape[1] // 2
    for s in range(steps):
        a, b = shares[0]["index"][s], shares[1]["index"][s]
        assert len(a) == len(b) == half
        assert not set(a.tolist()) & set(b.tolist()), f"step {start + s}: shares overlap"
        assert sorted(a.tolist() + b.tolist()) == sorted(ref["index"][s].tolist())
        np.testing.assert_array_equal(np.concatenate([a, b]), ref["index"][s])
        np.testing.assert_array_equal(
            np.concatenate([shares[0]["view1"][s], shares[1]["view1"][s]]), ref["view1"][s])
    # Consecutive steps read different examples (the shares are not one batch repeated).
    assert not np.array_equal(ref["index"][0], ref["index"][1])


def test_only_process_0_writes_logs_and_results(runs):
    """metrics.jsonl (each step once), the TensorBoard file (process 0's pid in its name),
    config.json and progress lines come from process 0 alone."""
    p0, p1 = runs.job("moco_2p").wait()
    pids = [p.pid for p in runs.job("moco_2p").procs]
    workdir = runs.path("moco_2p")
    records = read_metrics(workdir)
    # One writer: every step logged exactly once.
    assert [(r["kind"], r["step"]) for r in records] == \
        [("train", s) for s in range(1, MOCO_STEPS + 1)]
    # One TensorBoard event file, written by process 0 (its pid is in the file name).
    events = glob.glob(os.path.join(workdir, "**", "events.out.tfevents.*"), recursive=True)
    assert len(events) == 1, events
    assert f".{pids[0]}." in os.path.basename(events[0]), (events, pids)
    # config.json: complete, the same config as the 1-process run, no leftover temp file.
    with open(os.path.join(workdir, "config.json")) as f, \
            open(os.path.join(runs.path("moco_1p"), "config.json")) as g:
        assert json.load(f) == json.load(g)
    assert sorted(os.listdir(workdir)) == sorted(
        ["checkpoints", "config.json", os.path.basename(events[0]), "metrics.jsonl", "log.txt",
         workdir_lock.LOCK_NAME])
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", str(MOCO_STEPS)]
    # Progress lines: every step in process 0's log file, none on process 1.
    with open(os.path.join(workdir, "log.txt")) as f:
        log0 = f.read()
    steps0 = [int(m.group(2)) for m in PROGRESS.finditer(log0) if m.group(1) == "moco"]
    assert steps0 == list(range(1, MOCO_STEPS + 1)), log0[-3000:]
    assert PROGRESS.search(p0), p0[-3000:]
    assert not PROGRESS.search(p1), p1[-3000:]
    for out in (p0, p1):
        assert "Traceback" not in out and "error:" not in out


def test_distill_two_processes_end_where_one_process_ends(runs):
    """Phase 2 from moco_1p's checkpoint (written by 1 process, read as the teacher by each of
    the 2 processes): same frozen teacher bit for bit, same student within DISTILL_ATOL; the
    final evaluation is logged and written (eval_val.json) by process 0 only."""
    d0, d1 = runs.job("distill_2p").wait()
    runs.get("distill_1p")
    one, step1 = final_state(runs.path("distill_1p"))
    two, step2 = final_state(runs.path("distill_2p"))
    assert step1 == step2 == DISTILL_STEPS
    teacher, _ = final_state(runs.path("moco_1p"))
    expected = {"params": {"backbone": teacher["params"]["backbone"]},
                "batch_stats": {"backbone": teacher["batch_stats"]["backbone"]}}
    assert_close(two["teacher"], expected, rtol=0, atol=0, what="2-process teacher")
    assert_close(one["teacher"], expected, rtol=0, atol=0, what="1-process teacher")
    for name in ("params", "batch_stats"):
        assert_close(two[name], one[name], rtol=0, atol=DISTILL_ATOL, what=f"distill {name}")
    assert_close(two["step"], one["step"], rtol=0, atol=0, what="step")
    # The student moved far more than the tolerance (2e-2 from the teacher's backbone).
    assert max_change(one["params"]["backbone"], expected["params"]["backbone"]) > \
        5 * DISTILL_ATOL
    meta1 = checkpoints.load_meta(os.path.join(runs.path("distill_1p"), "checkpoints"))
    meta2 = checkpoints.load_meta(os.path.join(runs.path("distill_2p"), "checkpoints"))
    assert meta1["teacher"]["fingerprint"] == meta2["teacher"]["fingerprint"]
    train1 = [r for r in read_metrics(runs.path("distill_1p")) if r["kind"] == "train"]
    train2 = [r for r in read_metrics(runs.path("distill_2p")) if r["kind"] == "train"]
    assert [r["step"] for r in train2] == [r["step"] for r in train1] == \
        list(range(1, DISTILL_STEPS + 1))
    # Step 1: the same student (teacher backbone + the same new classifier) on the same global
    # batch; values differ only by the order of the BN and gradient reductions.
    for k in ("loss", "ce", "distill", "top1"):
        np.testing.assert_allclose(train2[0][k], train1[0][k], rtol=1e-5, err_msg=k)
    # Later steps: continuous in the params, which may differ by up to DISTILL_ATOL (grad_norm
    # is not compared: a flipped ReLU changes it discretely).
    for got, want in zip(train2[1:], train1[1:]):
        for k in ("loss", "ce", "distill"):
            np.testing.assert_allclose(got[k], want[k], rtol=DISTILL_RTOL_METRICS,
                                       err_msg=f"step {got['step']} {k}")
    assert os.path.exists(os.path.join(runs.path("distill_2p"), "eval_val.json"))
    final_eval = re.compile(r"step 4 eval: .*val_top1 \d")
    assert final_eval.search(d0) and not final_eval.search(d1), (d0[-2000:], d1[-2000:])
    evals = [r for r in read_metrics(runs.path("distill_2p")) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [DISTILL_STEPS]


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(tmp_path):
    """Only process 1 gets SIGTERM (process 0 never does): the per-step stop vote makes both
    save the same step and exit with preemption.EXIT_CODE well before the run's end."""
    from dvp_jax import preemption
    workdir = str(tmp_path / "stop")
    overrides = dict(MOCO, **{"num_epochs": 8.0})  # 32 steps, checkpoints every 4.
    job = Job("stop", cli("configs/moco.py:runlocal", workdir, overrides), str(tmp_path))
    try:
        t0 = time.time()
        metrics = os.path.join(workdir, "metrics.jsonl")
        while not (os.path.exists(metrics) and len(read_metrics(workdir)) >= 3):
            assert all(p.poll() is None for p in job.procs), job._read(0)[-3000:]
            assert time.time() - t0 < TIMEOUT, "the job did not start training"
            time.sleep(0.05)
        job.procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=TIMEOUT) for p in job.procs]
    finally:
        job.kill()
    out0, out1 = job._read(0), job._read(1)
    assert codes == [preemption.EXIT_CODE] * 2, (codes, out0[-3000:], out1[-3000:])
    step = checkpoints.latest_step(os.path.join(workdir, "checkpoints"))
    assert 3 <= step < 32, step
    assert f"checkpoint of step {step} saved" in out0 and f"checkpoint of step {step} saved" in out1
    assert [r["step"] for r in read_metrics(workdir)][-1] == step
