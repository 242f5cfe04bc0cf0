"""One run per workdir at a time: ``WORKDIR/.lock``, held with flock(2) while a run trains.

The kernel drops a flock when its process ends, however it ends (SIGKILL included), so a
killed run never leaves a stale lock. The file also records who holds it (pid, host, start
time, command), which a refused second run prints. Only process 0 of a multi-host run takes
the lock. Where flock does not work (some network file systems) or for gs:// workdirs, the
run goes on unlocked with a warning.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys

import jax
from absl import logging as log

from dvp_jax import errors

LOCK_NAME = ".lock"


class WorkdirLockedError(errors.UserError, RuntimeError):
    """Another run is training in this workdir now."""


def _holder_text(path: str) -> str:
    try:
        with open(path) as f:
            info = json.loads(f.read() or "{}")
        return (f"pid {info.get('pid')} on host {info.get('host')}, started "
                f"{info.get('started')} ({info.get('command', '?')})")
    except (OSError, ValueError):
        return "a process whose details could not be read"


@contextlib.contextmanager
def hold(workdir: str):
    """Holds WORKDIR/.lock for the duration; WorkdirLockedError if another run holds it."""
    workdir = os.fspath(workdir)
    if "://" in workdir or jax.process_index() != 0:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise WorkdirLockedError(
                    f"workdir {workdir!r} is in use by another run: {_holder_text(path)}. Wait "
                    f"for it to end (or stop it), or pass another --workdir.") from None
            log.warning("Cannot lock %s (%s): running without the one-run-per-workdir check.",
                        path, e)
            yield
            return
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"),
                "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
