"""Start-up safety of multi-host jobs: agreement check, bounded waits, leftover variables.

One 2-process job (gloo on 127.0.0.1, tests/multihost_sync_worker.py) covers the agreement
fingerprint and the barrier timeout; the leftover-environment checks run in this process or
as one quick single-process command.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from dvp_jax import distributed
from helpers import REPO, free_port, two_device_env


def test_two_processes_disagree_on_data_and_time_out_at_a_barrier(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "multihost_sync_worker.py"),
         f"--coordinator_address={address}", f"--process_id={i}", f"--out={tmp_path}/{i}.json"],
        env=two_device_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(2)]
    try:
        outs = [p.communicate(timeout=180)[0].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [json.load(open(tmp_path / f"{i}.json")) for i in range(2)]
    for r in results:
        assert r["agree_ok"]
        assert "disagree on data set sizes: process 1 on " in r["disagree"]
        assert "process 1 has {'train': 101}" in r["disagree"], r["disagree"]
    assert "waited 2 s at 'never' but not all 2 processes arrived" in results[0]["timeout"]
    assert 2 <= results[0]["timeout_s"] < 10


@pytest.mark.parametrize("env, message", [
    ({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}, r"SLURM_NTASKS=4 is set but .*not one task of an srun"),
    ({"SLURM_NTASKS": "2", "SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "1"}, r"SLURM_STEP_NUM_TASKS=1"),
    ({"DVP_NUM_PROCESSES": "2"}, r"DVP_NUM_PROCESSES=2 set but DVP_COORDINATOR_ADDRESS"),
])
def test_leftover_environment_is_named(monkeypatch, env, message):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "DVP_")):
            monkeypatch.delenv(k)
    assert distributed.environment_problem() is None
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import re
    assert re.search(message, distributed.environment_problem())


def test_a_srun_step_is_not_a_leftover(monkeypatch):
    for k, v in {"SLURM_NTASKS": "2", "SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1",
                 "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "2"}.items():
        monkeypatch.setenv(k, v)
    assert distributed.environment_problem() is None


def test_main_with_leftover_slurm_ntasks_fails_at_once(tmp_path):
    env = dict(os.environ, SLURM_NTASKS="8", SLURM_JOB_ID="1")
    for k in ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"):
        env.pop(k, None)
    start = time.time()
    r = subprocess.run([sys.executable, "-m", "dvp_jax.main", "--config=configs/moco.py:runlocal",
                        f"--workdir={tmp_path}/w"], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: DistributedError: SLURM_NTASKS=8")
    assert time.time() - start < 60  # Not the 300 s wait for peers that never come.
    assert not os.path.exists(tmp_path / "w")
