"""The one checkpoint format of dvp_jax: an Orbax CheckpointManager directory.

Layout of a checkpoint directory ``DIR`` (a trainer's ``WORKDIR/checkpoints``, or what
``python -m dvp_jax.convert_torch`` writes)::

    DIR/<step>/state   StandardSave of the train-state pytree. Every state has top-level
                       'params' and 'batch_stats': the variables of the model named in meta
                       (MoCo: the query encoder with its head; distill / classify: the
                       student with its classifier; SEED: the student with its MLP head).
                       Trainer-specific entries (momentum encoder, queue, opt_state, ...)
                       sit beside them.
    DIR/<step>/meta    JsonSave: {'trainer': str, 'model': {build(...) kwargs incl. 'name'},
                       'config': the full config as a dict, ...}.

Evaluators and Phase 2 read ``load_model_variables`` and need nothing else.
"""
from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from dvp_jax import errors

STATE_ITEM = "state"
META_ITEM = "meta"


class CheckpointError(errors.UserError, ValueError):
    """A checkpoint directory is missing, empty, not Orbax, or of another model."""


def absolute(directory: str) -> str:
    """Orbax needs absolute paths: a local path is made absolute; gs://... stays as it is."""
    path = os.fspath(directory)
    return path if "://" in path else os.path.abspath(path)


def manager(directory: str, *, max_to_keep: int | None = 3, read_only: bool = False,
            enable_async: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager for ``directory`` (local path or gs://...)."""
    directory = absolute(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=enable_async)
    return ocp.CheckpointManager(os.fspath(directory), options=options,
                                 item_names=(STATE_ITEM, META_ITEM))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict, *,
         force: bool = True) -> None:
    """Saves ``state`` (any pytree) and ``meta`` (JSON-able dict) as step ``step``."""
    mngr.save(step, args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}),
        force=force)


def _open_existing(directory: str) -> ocp.CheckpointManager:
    path = os.fspath(directory)
    if not path.startswith("gs://") and not os.path.isdir(path):
        raise CheckpointError(
            f"Checkpoint directory {path!r} does not exist. Pass the 'checkpoints' folder of a "
            f"workdir (e.g. WORKDIR/checkpoints) or a directory written by `python -m dvp_jax.convert_torch`.")
    mngr = manager(path, max_to_keep=None, read_only=True)
    if mngr.latest_step() is None:
        raise CheckpointError(
            f"{path!r} holds no Orbax checkpoint (no <step>/ folder with 'state' and 'meta'). "
            f"Pass the 'checkpoints' folder of a finished or running workdir.")
    return mngr


def latest_step(directory: str) -> int:
    """The newest step saved in ``directory``; CheckpointError if there is none."""
    return _open_existing(directory).latest_step()


def load_meta(directory: str, step: int | None = None) -> dict:
    """The 'meta' JSON of a checkpoint (default: the latest step)."""
    mngr = _open_existing(directory)
    step = mngr.latest_step() if step is None else step
    return mngr.restore(step, args=ocp.args.Composite(
        **{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]


def _local_target(mngr: ocp.CheckpointManager, step: int) -> Any:
    """The saved state's tree, every array as a ShapeDtypeStruct on this process's first device.

    Restoring onto it reads whole arrays into each process, whatever devices and processes
    wrote the checkpoint (a 4-device or 2-process checkpoint loads on 1 device and back)."""
    import jax
    tree = ocp.StandardCheckpointHandler().metadata(mngr.directory / str(step) / STATE_ITEM).tree
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local), tree)


def load_raw(directory: str, step: int | None = None) -> tuple[dict, Any, int]:
    """Restores (meta, state as nested dicts of host numpy arrays, step) without a target tree,
    on any device / process topology."""
    import jax
    mngr = _open_existing(directory)
    step = mngr.latest_step() if step is None else step
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardRestore(_local_target(mngr, step)),
               META_ITEM: ocp.args.JsonRestore()}))
    except Exception as e:  # Orbax raises many types for a damaged directory.
        raise CheckpointError(f"Cannot read the checkpoint at {directory!r} step {step}: {e}") from e
    return restored[META_ITEM], jax.device_get(restored[STATE_ITEM]), step


def load_model_variables(directory: str, step: int | None = None) -> tuple[dict, dict]:
    """(meta, {'params': ..., 'batch_stats': ...}) of the model a checkpoint holds."""
    meta, state, _ = load_raw(directory, step)
    if "params" not in state:
        raise CheckpointError(f"The checkpoint at {directory!r} has no 'params' entry.")
    return meta, {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
