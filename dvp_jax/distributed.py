"""Multi-host start: ``jax.distributed.initialize`` before anything touches the devices.

- TPU VMs and SLURM: JAX finds the coordinator itself (``--distributed=auto`` or
  automatically when the environment says so; SLURM only inside an ``srun`` step).
- Explicit: ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``
  (or the environment variables DVP_COORDINATOR_ADDRESS, DVP_NUM_PROCESSES, DVP_PROCESS_ID).
- One host with none of these: nothing happens.

Safety on many hosts:
- Leftover variables (``SLURM_NTASKS>1`` outside an ``srun`` step, an incomplete or
  inconsistent ``DVP_*`` set) stop the command at once with a ``DistributedError`` instead of
  waiting for processes that never come.
- ``--sync_timeout_s`` (default 600 s) bounds joining the job, every ``barrier`` and
  ``check_agreement``: a process that crashed or hangs elsewhere gives an error naming the
  barrier and the missing processes, not an endless wait.
- ``check_agreement`` (called by the training loop before the first step, the first
  collective) compares a fingerprint of (config, data set sizes, code version) across
  processes and names the host whose values differ.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import sys

import jax
from absl import flags

from dvp_jax import errors

_ENV = {"coordinator_address": "DVP_COORDINATOR_ADDRESS", "num_processes": "DVP_NUM_PROCESSES",
        "process_id": "DVP_PROCESS_ID"}
# Set by srun for every task of a job step (absent on a login node after salloc / sbatch).
_SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
DEFAULT_SYNC_TIMEOUT_S = 600


class DistributedError(errors.UserError, RuntimeError):
    """Processes of a multi-host job disagree, never arrive, or the environment is inconsistent."""


def define_flags() -> None:
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
    flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                      "auto: initialize when a cluster (SLURM, TPU pod, flags/env) is detected.")
    flags.DEFINE_enum("cpu_collectives", None, ["gloo", "mpi"],
                      "CPU collectives for multi-process runs on CPU (tests).")
    flags.DEFINE_integer("sync_timeout_s", DEFAULT_SYNC_TIMEOUT_S,
                         "Seconds a process waits for the others (joining, barriers, the "
                         "start-up agreement check) before stopping with an error.")


def _slurm_ntasks() -> int:
    try:
        return int(os.environ.get("SLURM_NTASKS", "1"))
    except ValueError:
        return 1


def environment_problem() -> str | None:
    """Why the environment cannot describe this process's multi-host job, or None if it can.

    Catches leftovers that would otherwise make a single-process command wait for peers that
    never come: SLURM_NTASKS>1 outside an srun step, and incomplete / inconsistent DVP_* sets.
    """
    if _slurm_ntasks() > 1:
        missing = [v for v in _SLURM_STEP_VARS if v not in os.environ]
        step_tasks = os.environ.get("SLURM_STEP_NUM_TASKS")
        if missing or step_tasks == "1":
            why = (f"{', '.join(missing)} unset" if missing else "SLURM_STEP_NUM_TASKS=1")
            return (f"SLURM_NTASKS={os.environ['SLURM_NTASKS']} is set but this process is not "
                    f"one task of an srun step ({why}): it would wait for processes that never "
                    f"start. Run it with `srun` (see launch/slurm.sbatch), or for one process "
                    f"`unset SLURM_NTASKS` or pass --distributed=off.")
    given = {k: os.environ[v] for k, v in _ENV.items() if os.environ.get(v)}
    if given and len(given) < len(_ENV):
        missing = [_ENV[k] for k in _ENV if k not in given]
        return (f"{', '.join(f'{_ENV[k]}={v}' for k, v in given.items())} set but "
                f"{', '.join(missing)} not (leftovers from another job?). Set all three for a "
                f"multi-host run, or `unset {' '.join(_ENV.values())}` for one process.")
    return None


def _cluster_detected() -> bool:
    return (_slurm_ntasks() > 1 or "TPU_WORKER_HOSTNAMES" in os.environ
            or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ)


def _timeout(timeout_s: float | None) -> float:
    if timeout_s is not None:
        return timeout_s
    f = flags.FLAGS
    if "sync_timeout_s" in f and f.is_parsed():
        return float(f.sync_timeout_s)
    return float(DEFAULT_SYNC_TIMEOUT_S)


def initialize() -> None:
    """Calls jax.distributed.initialize as the flags / environment say (idempotent)."""
    f = flags.FLAGS
    if f.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", f.cpu_collectives)
    if f.distributed == "off":
        return
    from_flags = {k: getattr(f, k) for k in _ENV if getattr(f, k) is not None}
    if not from_flags:
        problem = environment_problem()
        if problem:
            raise DistributedError(problem)
    explicit = {k: from_flags.get(k, os.environ.get(env)) for k, env in _ENV.items()}
    timeout = int(_timeout(None))
    if explicit["coordinator_address"]:
        if explicit["num_processes"] is None or explicit["process_id"] is None:
            raise DistributedError("--coordinator_address needs --num_processes and --process_id "
                                   "(or DVP_NUM_PROCESSES and DVP_PROCESS_ID).")
        n, i = int(explicit["num_processes"]), int(explicit["process_id"])
        if not 0 <= i < n:
            raise DistributedError(f"process_id={i} is not in [0, num_processes={n}).")
        origin = "flags" if from_flags else "the DVP_* environment variables"
        print(f"distributed: process {i} of {n} joining {explicit['coordinator_address']} (from "
              f"{origin}); waiting up to {timeout} s for the others.", file=sys.stderr, flush=True)
        kwargs = dict(coordinator_address=explicit["coordinator_address"], num_processes=n,
                      process_id=i)
    elif f.distributed == "on" or _cluster_detected():
        print(f"distributed: joining the cluster's job; waiting up to {timeout} s for the "
              f"others.", file=sys.stderr, flush=True)
        kwargs = {}
    else:
        return
    try:
        jax.distributed.initialize(initialization_timeout=timeout, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
        if "already initialized" in str(e):
            return
        raise DistributedError(
            f"could not join the multi-host job within {timeout} s ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Check that every process started "
            f"with the same coordinator and process count, or run one process with "
            f"--distributed=off.") from e


_uses: dict[str, int] = {}  # name -> calls so far; every process calls in the same order.


def _unique(name: str) -> str:
    """``name`` plus how often it was used before: coordination-service keys and barrier ids
    are single-use (the Table-1 runner, e.g., runs the start-up check once per stage)."""
    _uses[name] = _uses.get(name, 0) + 1
    return f"dvp:{name}:{_uses[name]}"


def _client():
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state.client


def barrier(name: str, timeout_s: float | None = None) -> None:
    """Waits until every process reached ``barrier(name)``; DistributedError after the timeout.

    Uses the coordination service (not a device collective), so it works before any
    computation. Single process: returns at once.
    """
    if jax.process_count() == 1:
        return
    timeout = _timeout(timeout_s)
    try:
        _client().wait_at_barrier(_unique(f"barrier:{name}"), int(timeout * 1000))
    except Exception as e:  # pylint: disable=broad-except
        raise DistributedError(
            f"process {jax.process_index()} on {socket.gethostname()} waited {timeout:g} s at "
            f"{name!r} but not all {jax.process_count()} processes arrived: another process "
            f"crashed, hangs or is slower (see its log). Raise --sync_timeout_s if it is only "
            f"slow.") from e


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 (16 hex digits) of the dvp_jax package's Python sources, in path order."""
    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()[:16]


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_agreement(name: str, parts: dict, timeout_s: float | None = None) -> None:
    """Every process must pass equal ``parts`` (JSON-able; e.g. config, data set sizes, steps).

    The code version is added here. Each process publishes a digest per part through the
    coordination service and compares all of them; a difference raises DistributedError on
    every process, naming the part and the processes / hosts that differ from process 0.
    Single process: returns at once.
    """
    if jax.process_count() == 1:
        return
    timeout_ms = int(_timeout(timeout_s) * 1000)
    parts = dict(parts, code_version=code_version())
    mine = {"host": socket.gethostname(), "digests": {k: _digest(v) for k, v in parts.items()},
            "small": {k: v for k, v in parts.items() if len(json.dumps(v, default=str)) <= 200}}
    client = _client()
    key = _unique(f"agree:{name}")
    client.key_value_set(f"{key}:{jax.process_index()}", json.dumps(mine))
    everyone = []
    for p in range(jax.process_count()):
        try:
            everyone.append(json.loads(client.blocking_key_value_get(f"{key}:{p}", timeout_ms)))
        except Exception as e:  # pylint: disable=broad-except
            raise DistributedError(
                f"process {jax.process_index()} waited {timeout_ms / 1000:g} s for process {p}'s "
                f"{name!r} fingerprint: it crashed, hangs or is slower (see its log). Raise "
                f"--sync_timeout_s if it is only slow.") from e
    reference = everyone[0]["digests"]
    differing = [(p, k) for p, other in enumerate(everyone) for k in sorted(reference)
                 if other["digests"].get(k) != reference[k]]
    if differing:
        procs = sorted({p for p, _ in differing})
        keys = sorted({k for _, k in differing})
        hosts = ", ".join(f"process {p} on {everyone[p]['host']}" for p in procs)
        values = "; ".join(f"{k}: process {p} has {everyone[p]['small'][k]}" for p in [0] + procs
                           for k in keys if k in everyone[p]["small"])
        raise DistributedError(
            f"{name}: the processes disagree on {', '.join(keys)}: {hosts} differ(s) from "
            f"process 0 on {everyone[0]['host']}{f' ({values})' if values else ''}. Give every host the same code, config and data "
            f"(e.g. rsync --delete the data set, check the config files) and start again.")
