"""SIGTERM and SIGINT (Ctrl-C): save a checkpoint if training, then exit with ``EXIT_CODE``.

- Inside the training loop (``deferred()``), a signal only sets a flag; the loop checks it
  after every step, saves a checkpoint of that step and raises ``Preempted``. Multi-host: the
  processes agree on the flag through one tiny all-gather per step (``agreed``); every
  process stops after the same step.
- Anywhere else (evaluation, between pipeline stages, start-up) the handler raises
  ``Preempted`` at once: nothing there needs saving, a rerun redoes that part.
- A second Ctrl-C while a save is pending stops at once (KeyboardInterrupt, no save).

``EXIT_CODE`` is 0: launch/slurm.sbatch requeues a job whose step exits 0 after it asked it to
stop (time limit), and every launcher treats 0 as "stopped cleanly". A rerun of the same
command resumes from the checkpoint.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Any

import jax
import numpy as np
from absl import logging as log

EXIT_CODE = 0
SIGNALS = (signal.SIGTERM, signal.SIGINT)

_requested: str | None = None  # Name of the signal that asked to stop, or None.
_deferred = 0  # > 0 while the training loop will save and stop itself.
_installed = 0


class Preempted(SystemExit):
    """A stop signal arrived; if it came during training, a checkpoint of ``step`` was saved."""

    def __init__(self, step: int | None = None, where: str = ""):
        super().__init__(EXIT_CODE)
        self.step, self.where = step, where

    def __str__(self):
        saved = (f"checkpoint of step {self.step} saved" if self.step is not None
                 else "nothing to save")
        return f"stopped by {_requested or 'a signal'}{self.where}: {saved}; rerun the same " \
               f"command to resume."


def _handle(signum, frame):
    global _requested
    name = signal.Signals(signum).name
    if _requested and signum == signal.SIGINT and _deferred:
        raise KeyboardInterrupt("second Ctrl-C: stopped without saving")
    _requested = name
    if _deferred:
        log.warning("%s received: saving a checkpoint after this step, then exiting "
                    "(Ctrl-C again: exit without saving).", name)
        return
    raise Preempted(None, " outside training")


@contextlib.contextmanager
def installed():
    """SIGTERM and SIGINT handlers for the duration (nested uses share one installation).
    Not the main thread (e.g. a notebook worker): no handlers, nothing happens."""
    global _installed, _requested
    previous = {}
    if _installed == 0:
        try:
            previous = {s: signal.signal(s, _handle) for s in SIGNALS}
        except ValueError:
            previous = None
    _installed += 1
    try:
        yield
    finally:
        _installed -= 1
        if _installed == 0:
            for s, handler in (previous or {}).items():
                signal.signal(s, handler)
            _requested = None


@contextlib.contextmanager
def deferred():
    """While inside: a signal only sets the flag (the caller saves and raises Preempted)."""
    global _deferred
    _deferred += 1
    try:
        yield
    finally:
        _deferred -= 1


@contextlib.contextmanager
def interruptible():
    """Undoes ``deferred`` for the duration: a signal (or one already pending) raises Preempted
    at once (single-process evaluation inside the training loop)."""
    global _deferred
    saved, _deferred = _deferred, 0
    try:
        check()
        yield
    finally:
        _deferred = saved


def requested() -> bool:
    """A stop signal arrived in THIS process."""
    return _requested is not None


def check(where: str = "") -> None:
    """Raises Preempted if a stop signal arrived (for code that runs with signals deferred)."""
    if _requested is not None:
        raise Preempted(None, where)


def agreed(after: Any = None) -> bool:
    """True on every process once any process got a stop signal (one process: this one's
    flag). Multi-host: one small all-gather of the flags per call (the loop calls it after
    every step, so all processes stop after the same step).

    ``after``: arrays of the step just dispatched. On CPU (gloo collectives) they are waited
    for first: XLA:CPU may start this all-gather while the step's own gradient all-reduce is
    still running, and gloo pairs collectives by their order in each process, so two
    processes that start them in different orders wait for each other forever (seen as a
    hang at the first step on a loaded 2-core machine). GPU/TPU order collectives on one
    stream per device and do not wait.
    """
    if jax.process_count() == 1:
        return requested()
    if after is not None and jax.default_backend() == "cpu":
        jax.block_until_ready(after)
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array(int(requested()), np.int32))
    return bool(np.any(flags))
