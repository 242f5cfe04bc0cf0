"""The one training loop every trainer shares.

A trainer describes its run as a ``Task`` (pure init and step functions, a batch source,
durations, evaluators); ``run`` does the rest:

- jit: ``init_state`` under ``jax.jit(out_shardings=replicated)``, ``train_step`` with the
  state donated, batches sharded over the mesh's 'data' axis, state replicated;
- checkpoints: Orbax, every ``loop.checkpoint_every_steps`` and at the end, last
  ``loop.keep_checkpoints`` kept, automatic resume from ``WORKDIR/checkpoints``;
- the config saved as ``WORKDIR/config.json``; a workdir holding another config is refused
  with the differing keys named;
- metrics: clu writers (TensorBoard + log lines) on process 0; metrics leave the devices
  only every ``loop.log_every_steps`` steps (no host sync in between);
- progress: a live bar (terminal) or periodic lines with step, epoch, loss, lr, img/s and ETA
  (dvp_jax.console); every logged step with all metrics in the log file;
- NaN guard: a non-finite metric stops the run naming the step and metric, before any
  checkpoint of the bad state is written;
- one run per workdir: WORKDIR/.lock (dvp_jax.workdir_lock); a second run is refused;
- resume skips damaged checkpoints: each is moved to WORKDIR/checkpoints_damaged/ (never
  deleted) and the newest intact one loads; a failed save (disk full, read-only) stops with
  CheckpointSaveError and leaves the previous checkpoint as it was;
- preemption: SIGTERM or SIGINT saves a checkpoint of the current step and exits with
  ``preemption.EXIT_CODE`` (checked after every step, also during evaluation); rerun the
  command to resume.
"""
from __future__ import annotations

import dataclasses
import errno
import itertools
import math
import os
import re
import time
from collections import deque
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging as log
from jax.experimental import multihost_utils

from dvp_jax import (checkpoints, console, distributed, errors, fileio, jsonfmt, preemption,
                     sharding, workdir_config, workdir_lock)


class NonFiniteError(errors.UserError, FloatingPointError):
    """The loss or a gradient became NaN or Inf."""


class CheckpointSaveError(errors.UserError, OSError):
    """A checkpoint could not be written (disk full, read-only or missing permissions)."""


Preempted = preemption.Preempted  # Raised after SIGTERM / SIGINT (see dvp_jax.preemption).


@dataclasses.dataclass
class Task:
    """What a trainer hands to ``run``.

    init_state: rng key -> state pytree with top-level 'params' and 'batch_stats' (pure).
    train_step: (state, batch) -> (state, metrics of scalars) (pure; jitted here).
    train_batches: start_step -> iterator of host-local numpy batches, deterministic in the
        start step (resuming at step s yields what an uninterrupted run sees at step s).
    evaluators: state -> {name: float}; run every ``eval_every_steps`` and at the end.
    images_per_step: global images consumed by one step (for img/s).
    meta: JSON-able dict saved beside every checkpoint (see dvp_jax.checkpoints).
    check_resume: meta of the checkpoint being resumed -> raises if it is incompatible.
    """
    name: str
    init_state: Callable[[jax.Array], Any]
    train_step: Callable[[Any, dict], tuple[Any, dict]]
    train_batches: Callable[[int], Iterator[dict]]
    total_steps: int
    steps_per_epoch: int
    images_per_step: int
    meta: dict
    evaluators: Sequence[Callable[[Any], dict]] = ()
    eval_every_steps: int = 0
    check_resume: Callable[[dict], None] | None = None


# ----------------------------------------------------------------------------- helpers


def prefetch_to_mesh(batches: Iterator[dict], mesh, size: int = 2) -> Iterator[dict]:
    """Turns host batches into global sharded arrays ``size`` batches ahead (async copies)."""
    queue: deque = deque()
    for batch in batches:
        queue.append(sharding.to_global(batch, mesh))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def _compile_before_first_step(step_fn, state: Any, batches: Iterator[dict]):
    """(batches, compiled step): the first global batch is read and ``step_fn`` compiled
    (ahead of time, for that batch's shapes and shardings) before the first step runs."""
    first = next(batches)
    compiled = step_fn.lower(state, first).compile()
    return itertools.chain([first], batches), compiled


@jax.jit
def tree_all_finite(tree: Any) -> jax.Array:
    """One boolean: every float leaf of ``tree`` is finite (one compiled program per tree)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def first_non_finite(history: list[tuple[int, dict]]) -> tuple[int, str] | None:
    """(step, metric) of the first non-finite value in fetched host metrics, or None."""
    for step, metrics in history:
        for name, value in sorted(metrics.items()):
            if not np.all(np.isfinite(value)):
                return step, name
    return None


_stage_label = ""


def set_stage_label(label: str) -> None:
    """The name progress lines show instead of the task's (the Table-1 runner names its stage and
    seed with it, e.g. 'seed 0 · moco'); '' restores the task's name."""
    global _stage_label
    _stage_label = label


def append_jsonl(workdir: str, record: dict) -> None:
    """Appends one JSON line to WORKDIR/metrics.jsonl (process 0 only); plots read it."""
    if jax.process_index() != 0:
        return
    fileio.append_line(os.path.join(workdir, "metrics.jsonl"), jsonfmt.dumps(record, sort_keys=True))


def init_on_mesh(init_state: Callable[[jax.Array], Any], mesh, seed: int) -> Any:
    """The initial state, replicated over ``mesh``.

    Traced with non-partitionable threefry: the same kind of random init, but XLA:CPU
    compiles a ResNet init ~3x faster (13 s -> 4 s for a ResNet-18); the state is
    replicated, so partitionable random bits buy nothing here.
    """
    with jax.threefry_partitionable(False):
        return jax.jit(init_state, out_shardings=sharding.replicated(mesh))(
            jax.random.PRNGKey(seed))


def _abstract_state(task: Task, mesh) -> Any:
    shapes = jax.eval_shape(task.init_state, jax.random.PRNGKey(0))
    rep = sharding.replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)


# ----------------------------------------------------------------------------- the loop


DAMAGED_DIR = "checkpoints_damaged"  # Where unreadable checkpoints are moved (never deleted).
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def disk_errno(e: BaseException) -> int | None:
    """The errno of a full disk / read-only / permission error, or None for anything else.
    OSError carries it; TensorStore (under Orbax) raises ValueError('... [os_error_code=28]')."""
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        return e.errno
    match = re.search(r"os_error_code='?(\d+)", str(e))
    if match and int(match.group(1)) in DISK_ERRNOS:
        return int(match.group(1))
    return None


def _set_aside(ckpt_dir: str, step: int, why: Exception) -> str:
    """Moves the unreadable checkpoint ``step`` to WORKDIR/checkpoints_damaged/<step>.<time>
    (process 0; the others wait for it) and returns where it went."""
    workdir = os.path.dirname(checkpoints.absolute(ckpt_dir).rstrip("/"))
    target = os.path.join(workdir, DAMAGED_DIR, f"{step}.{time.strftime('%Y%m%dT%H%M%S')}")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(os.path.join(ckpt_dir, str(step)), target)
        log.error("Checkpoint %s/%d is damaged (%s: %s); moved to %s, resuming from the newest "
                  "intact one.", ckpt_dir, step, type(why).__name__, str(why)[:300], target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"dvp_set_aside_{step}")
    return target


def _restore_latest(task: Task, config, ckpt_dir: str, mesh):
    """(manager, state, step) from the newest intact checkpoint, or a fresh init (step 0).
    Damaged checkpoints on the way are set aside (see _set_aside)."""
    import orbax.checkpoint as ocp
    while True:
        mngr = checkpoints.manager(ckpt_dir, max_to_keep=config.loop.keep_checkpoints)
        start = mngr.latest_step()
        if start is None:
            return mngr, init_on_mesh(task.init_state, mesh, config.seed), 0
        try:
            saved_meta = checkpoints.load_meta(ckpt_dir, start)
        except Exception as e:  # Orbax raises many types for a truncated or missing file.
            _set_aside(ckpt_dir, start, e)
            continue
        if task.check_resume is not None:
            task.check_resume(saved_meta)  # A mismatch is the user's to fix: not damage.
        try:
            restored = mngr.restore(start, args=ocp.args.Composite(
                **{checkpoints.STATE_ITEM: ocp.args.StandardRestore(_abstract_state(task, mesh))}))
        except Exception as e:
            _set_aside(ckpt_dir, start, e)
            continue
        log.info("[%s] resumed from step %d of %s", task.name, start, ckpt_dir)
        return mngr, restored[checkpoints.STATE_ITEM], start


def run(task: Task, config, workdir: str, mesh=None) -> Any:
    """Trains ``task`` to ``task.total_steps`` in ``workdir`` (resuming if possible).

    Returns the final state (replicated global arrays). Raises NonFiniteError on NaN/Inf,
    ConfigMismatchError for a workdir of another config, WorkdirLockedError while another run
    uses the workdir, CheckpointSaveError when a checkpoint cannot be written (the previous one
    stays), Preempted after SIGTERM / SIGINT (a checkpoint of the last step is saved first).
    """
    with workdir_lock.hold(workdir), preemption.installed(), preemption.deferred():
        state = _run_locked(task, config, workdir, mesh)
        # A signal during the last step or the final save: the run is complete and saved;
        # stop here rather than go on (e.g. to the next Table-1 stage).
        if preemption.requested():
            raise Preempted(task.total_steps, " at the end of training")
        return state


def _run_locked(task: Task, config, workdir: str, mesh) -> Any:
    from clu import metric_writers  # Imports TensorFlow: kept out of module import time.

    mesh = sharding.make_mesh() if mesh is None else mesh
    lc = config.loop
    workdir_config.check_or_save_config(config, workdir)
    from dvp_jax.input import sources  # Imports TensorFlow: kept out of module import time.
    # Before the first collective: every host must have the same config, data and code.
    distributed.check_agreement("start", {
        "config": workdir_config.config_to_dict(config),
        "data set sizes": sources.split_sizes(config.input),
        "steps": [task.total_steps, task.steps_per_epoch, task.images_per_step]})
    ckpt_dir = os.path.join(workdir, "checkpoints")
    meta = dict(task.meta, config=workdir_config.config_to_dict(config))
    rep = sharding.replicated(mesh)
    mngr, state, start = _restore_latest(task, config, ckpt_dir, mesh)

    lead = jax.process_index() == 0  # Only process 0 writes metrics and progress lines.
    writer = (metric_writers.create_default_writer(workdir, asynchronous=False) if lead
              else metric_writers.MultiWriter([]))
    step_fn = jax.jit(task.train_step, donate_argnums=0,
                      in_shardings=(rep, sharding.batch_sharded(mesh)), out_shardings=(rep, rep))
    saved_step = start if start else None

    def save(step: int, state: Any) -> None:
        nonlocal saved_step
        if step == saved_step:
            return
        if not bool(tree_all_finite(state["params"])):
            raise NonFiniteError(f"[{task.name}] params are not finite at step {step}; "
                                 f"the last good checkpoint in {ckpt_dir} is kept.")
        try:
            checkpoints.save(mngr, step, state, meta)
            mngr.wait_until_finished()
        except Exception as e:  # Orbax / TensorStore report a full disk as ValueError.
            code = disk_errno(e)
            if code is None:
                raise
            raise CheckpointSaveError(
                code, f"cannot write the checkpoint of step {step} to {ckpt_dir}: "
                f"{os.strerror(code)}. The previous checkpoint (step {saved_step}) is intact; "
                f"free space or fix the permissions, then rerun the same command to resume "
                f"from it. ({str(e)[:300]})") from e
        saved_step = step

    progress = console.Progress(_stage_label or task.name, task.total_steps, start,
                                enabled=lead)

    def evaluate(step: int, state: Any) -> None:
        results = {}
        for evaluator in task.evaluators:
            results.update(evaluator(state))
        if results:
            writer.write_scalars(step, results)
            append_jsonl(workdir, dict(results, step=step, epoch=step / task.steps_per_epoch,
                                       kind="eval"))
            progress.note(f"step {step} eval: " +
                          "  ".join(f"{k} {v:.2f}" for k, v in sorted(results.items())))

    # Bounded wait for every process before the first step (a collective that would hang).
    distributed.barrier(f"{task.name}: first step")

    def evaluate_or_stop(step: int, state: Any) -> None:
        """One process: a stop signal during the evaluation stops it at once (the state of
        ``step`` is saved first). Several: the step-level vote decides (all stop together)."""
        if jax.process_count() > 1:
            evaluate(step, state)
            return
        try:
            with preemption.interruptible():
                evaluate(step, state)
        except preemption.Preempted:
            save(step, state)
            raise preemption.Preempted(step, f" during the evaluation at step {step}") from None

    pending: list[tuple[int, dict]] = []  # Device metrics not fetched yet.
    t_last, step_last = time.time(), start
    step = start
    try:
        batches = prefetch_to_mesh(task.train_batches(start), mesh, config.input.prefetch)
        if start < task.total_steps:
            batches, step_fn = _compile_before_first_step(step_fn, state, batches)
            # gloo (CPU) sets up a program's collectives on its first run and gives up after
            # 30 s; the slow parts (input start-up, compiling) are done, so start together.
            distributed.barrier(f"{task.name}: step compiled")
        for step in range(start + 1, task.total_steps + 1):
            state, metrics = step_fn(state, next(batches))
            preempt = preemption.agreed(after=metrics)
            pending.append((step, metrics))
            at_log = step % lc.log_every_steps == 0 or step == task.total_steps
            at_ckpt = step % lc.checkpoint_every_steps == 0 or step == task.total_steps
            at_eval = bool(task.eval_every_steps) and step % task.eval_every_steps == 0
            if at_log or at_ckpt or at_eval or preempt:
                fetched = jax.device_get(pending)
                pending = []
                bad = first_non_finite(fetched)
                if bad is not None:
                    raise NonFiniteError(
                        f"[{task.name}] metric '{bad[1]}' is not finite at step {bad[0]}. "
                        f"Nothing after the last good checkpoint was saved ({ckpt_dir}). "
                        "Lower the learning rate or check the input data.")
                if at_log:
                    now = time.time()
                    sps = (step - step_last) / max(now - t_last, 1e-9)
                    t_last, step_last = now, step
                    means = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
                    means.update(steps_per_sec=sps, images_per_sec=sps * task.images_per_step,
                                 epoch=step / task.steps_per_epoch)
                    writer.write_scalars(step, means)
                    append_jsonl(workdir, dict(means, step=step, kind="train"))
                    progress.update(step, epoch=means["epoch"],
                                    metrics={k: means[k] for k in fetched[-1][1]},
                                    steps_per_sec=sps, images_per_sec=sps * task.images_per_step)
            if at_ckpt or preempt:
                save(step, state)
            if preempt:
                raise Preempted(step)
            if at_eval:
                evaluate_or_stop(step, state)
        if task.evaluators and not (task.eval_every_steps and
                                    task.total_steps % task.eval_every_steps == 0):
            evaluate_or_stop(task.total_steps, state)
    finally:
        progress.close()
        writer.flush()
    return state


def total_steps_for(num_epochs: float, steps_per_epoch: int) -> int:
    """Epoch-based durations -> whole steps (at least 1)."""
    return max(1, int(math.ceil(num_epochs * steps_per_epoch)))
