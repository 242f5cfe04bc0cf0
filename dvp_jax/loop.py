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
- preemption: SIGTERM saves a checkpoint and exits cleanly; rerun the command to resume.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from collections import deque
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging as log
from jax.experimental import multihost_utils

from dvp_jax import checkpoints, console, distributed, errors, jsonfmt, sharding


# Config keys that may change between a run and its resume (they change no result). Paths
# may move with a workdir: a teacher is identified by its fingerprint (Task.check_resume),
# and a warm start only matters before the first checkpoint.
RESUMABLE_CHANGES = ("loop.log_every_steps", "loop.allow_config_change", "loop.eval_every_epochs",
                     "loop.checkpoint_every_steps", "loop.keep_checkpoints", "input.prefetch",
                     "input.data_dir", "input.manual_dir", "distill.teacher_checkpoint",
                     "seed_distill.teacher_checkpoint", "classify.init_checkpoint")


class NonFiniteError(errors.UserError, FloatingPointError):
    """The loss or a gradient became NaN or Inf."""


class ConfigMismatchError(errors.UserError, ValueError):
    """The workdir holds a run made with another config."""


class Preempted(SystemExit):
    """SIGTERM arrived; a checkpoint was written. Exit code 0 so schedulers requeue cleanly."""

    def __init__(self, step: int):
        super().__init__(0)
        self.step = step


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


# ----------------------------------------------------------------------------- config


def _flatten(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}


def config_to_dict(config) -> dict:
    """A ConfigDict as plain JSON-able nested dicts."""
    return json.loads(config.to_json_best_effort())


def check_or_save_config(config, workdir: str) -> None:
    """Saves WORKDIR/config.json, or refuses a workdir whose saved config differs."""
    path = os.path.join(workdir, "config.json")
    current = config_to_dict(config)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        a, b = _flatten(saved), _flatten(current)
        diff = sorted(k for k in set(a) | set(b)
                      if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)
        if diff and not config.loop.allow_config_change:
            rows = "\n".join(f"  {k}: saved {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}"
                             for k in diff)
            raise ConfigMismatchError(
                f"Workdir {workdir!r} holds a run with a different config:\n{rows}\n"
                "Use another --workdir for a fresh run, or pass --config.loop.allow_config_change=True "
                "to resume this one with the new values.")
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        # Written whole then renamed: another process checking it never reads a partial file.
        with open(path + ".tmp", "w") as f:
            json.dump(current, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)


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


class _PreemptionFlag:
    """Set by SIGTERM; all processes agree on it at sync points."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # Not the main thread (e.g. a notebook worker): no handler.
            self._previous = None

    def uninstall(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and exiting.")
        self.requested = True

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.array(self.requested))
        return bool(np.any(flags))


_stage_label = ""


def set_stage_label(label: str) -> None:
    """The name progress lines show instead of the task's (the pipeline names its stage and
    seed with it, e.g. 'seed 0 · moco'); '' restores the task's name."""
    global _stage_label
    _stage_label = label


def append_jsonl(workdir: str, record: dict) -> None:
    """Appends one JSON line to WORKDIR/metrics.jsonl (process 0 only); plots read it."""
    if jax.process_index() != 0:
        return
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(jsonfmt.dumps(record, sort_keys=True) + "\n")


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


def run(task: Task, config, workdir: str, mesh=None) -> Any:
    """Trains ``task`` to ``task.total_steps`` in ``workdir`` (resuming if possible).

    Returns the final state (replicated global arrays). Raises NonFiniteError on NaN/Inf,
    ConfigMismatchError for a workdir of another config, Preempted after SIGTERM.
    """
    from clu import metric_writers  # Imports TensorFlow: kept out of module import time.

    mesh = sharding.make_mesh() if mesh is None else mesh
    lc = config.loop
    check_or_save_config(config, workdir)
    from dvp_jax.input import sources  # Imports TensorFlow: kept out of module import time.
    # Before the first collective: every host must have the same config, data and code.
    distributed.check_agreement("start", {
        "config": config_to_dict(config), "data set sizes": sources.split_sizes(config.input),
        "steps": [task.total_steps, task.steps_per_epoch, task.images_per_step]})
    ckpt_dir = os.path.join(workdir, "checkpoints")
    mngr = checkpoints.manager(ckpt_dir, max_to_keep=lc.keep_checkpoints)
    meta = dict(task.meta, config=config_to_dict(config))

    rep = sharding.replicated(mesh)
    start = mngr.latest_step()
    if start is None:
        state = init_on_mesh(task.init_state, mesh, config.seed)
        start = 0
    else:
        saved_meta = checkpoints.load_meta(ckpt_dir, start)
        if task.check_resume is not None:
            task.check_resume(saved_meta)
        import orbax.checkpoint as ocp
        restored = mngr.restore(start, args=ocp.args.Composite(
            **{checkpoints.STATE_ITEM: ocp.args.StandardRestore(_abstract_state(task, mesh))}))
        state = restored[checkpoints.STATE_ITEM]
        log.info("[%s] resumed from step %d of %s", task.name, start, ckpt_dir)

    lead = jax.process_index() == 0  # Only process 0 writes metrics and progress lines.
    writer = (metric_writers.create_default_writer(workdir, asynchronous=False) if lead
              else metric_writers.MultiWriter([]))
    step_fn = jax.jit(task.train_step, donate_argnums=0,
                      in_shardings=(rep, sharding.batch_sharded(mesh)), out_shardings=(rep, rep))

    def save(step: int, state: Any) -> None:
        if not bool(tree_all_finite(state["params"])):
            raise NonFiniteError(f"[{task.name}] params are not finite at step {step}; "
                                 f"the last good checkpoint in {ckpt_dir} is kept.")
        checkpoints.save(mngr, step, state, meta)
        mngr.wait_until_finished()

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
    flag = _PreemptionFlag()
    flag.install()
    pending: list[tuple[int, dict]] = []  # Device metrics not fetched yet.
    t_last, step_last = time.time(), start
    step = start
    try:
        batches = prefetch_to_mesh(task.train_batches(start), mesh, config.input.prefetch)
        for step in range(start + 1, task.total_steps + 1):
            state, metrics = step_fn(state, next(batches))
            pending.append((step, metrics))
            at_log = step % lc.log_every_steps == 0 or step == task.total_steps
            at_ckpt = step % lc.checkpoint_every_steps == 0 or step == task.total_steps
            at_eval = bool(task.eval_every_steps) and step % task.eval_every_steps == 0
            preempt = (at_log or jax.process_count() == 1) and flag.agreed()
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
            if at_eval:
                evaluate(step, state)
            if preempt:
                raise Preempted(step)
        if task.evaluators and not (task.eval_every_steps and
                                    task.total_steps % task.eval_every_steps == 0):
            evaluate(task.total_steps, state)
    finally:
        progress.close()
        flag.uninstall()
        writer.flush()
    return state


def is_finished(workdir: str, total_steps: int) -> bool:
    """True when WORKDIR/checkpoints holds the final step."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return False
    step = checkpoints.manager(ckpt_dir, max_to_keep=None, read_only=True).latest_step()
    return step is not None and step >= total_steps


def total_steps_for(num_epochs: float, steps_per_epoch: int) -> int:
    """Epoch-based durations -> whole steps (at least 1)."""
    return max(1, int(math.ceil(num_epochs * steps_per_epoch)))
