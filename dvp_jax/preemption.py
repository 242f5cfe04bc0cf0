"""SIGTERM and SIGINT (Ctrl-C): save a checkpoint if training, then exit with ``EXIT_CODE``.

- Inside the training loop (``deferred()``), a signal only sets a flag; the loop checks it
  after every step, saves a checkpoint of that step and raises ``Preempted``. Multi-host: the
  processes agree on the flag through one tiny all-reduce per step, read one step later so
  that it never stalls the pipelined dispatch (``StopVote``); every process stops at the same
  step.
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


class StopVote:
    """Multi-host agreement on the stop flag, folded into the train step; decisions lag a step.

    The loop's jitted step takes ``flags()`` (this process's flag on each of its devices, a
    global int32 array sharded like a batch) and returns ``max(flags)``: the OR over all
    processes is an all-reduce INSIDE the step's program (a separate collective program could
    interleave differently with the step's own collectives on different hosts and deadlock).
    ``decide(result)`` keeps this step's result and returns the previous step's, so reading it
    never stalls the pipelined dispatch. All processes read the same reduction, so they all
    stop after the same step.
    """

    def __init__(self, mesh):
        from dvp_jax import sharding
        self._sharding = sharding.batch_sharded(mesh)
        self._local = len(mesh.local_devices)
        self._pending = None

    def flags(self) -> jax.Array:
        local = np.full((self._local,), int(requested()), np.int32)  # int32: gloo has no
        # all-reduce for booleans.
        return jax.make_array_from_process_local_data(self._sharding, local)

    def decide(self, result: jax.Array) -> bool:
        previous, self._pending = self._pending, result
        return previous is not None and int(np.asarray(previous.addressable_data(0))) > 0
