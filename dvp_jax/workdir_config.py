"""WORKDIR/config.json: the config a workdir's run was made with, and what may change on resume.

``check_or_save_config`` saves the config of a new run and refuses to resume a workdir whose
saved config differs in a key outside ``RESUMABLE_CHANGES``, naming every differing key with
its saved and current value (``--config.loop.allow_config_change=True`` resumes anyway).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax

from dvp_jax import errors, fileio

# Config keys that may change between a run and its resume (they change no result). Paths
# may move with a workdir: a teacher is identified by its fingerprint (Task.check_resume),
# and a warm start only matters before the first checkpoint.
RESUMABLE_CHANGES = ("loop.log_every_steps", "loop.allow_config_change", "loop.eval_every_epochs",
                     "loop.checkpoint_every_steps", "loop.keep_checkpoints", "input.prefetch",
                     "input.data_dir", "input.manual_dir", "distill.teacher_checkpoint",
                     "seed_distill.teacher_checkpoint", "classify.init_checkpoint")



class ConfigMismatchError(errors.UserError, ValueError):
    """The workdir holds a run made with another config."""


def flatten(d: Any, prefix: str = "") -> dict:
    """Nested dicts -> {'a.b.c': leaf} (tuples as lists, as JSON stores them)."""
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}


def config_to_dict(config) -> dict:
    """A ConfigDict as plain JSON-able nested dicts."""
    return json.loads(config.to_json_best_effort())


def changed_keys(saved: dict, current: dict) -> list[str]:
    """Sorted dotted keys whose values differ between two config dicts, apart from
    ``RESUMABLE_CHANGES`` (a key absent on one side counts as changed)."""
    a, b = flatten(saved), flatten(current)
    return sorted(k for k in set(a) | set(b)
                  if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)


def check_or_save_config(config, workdir: str) -> None:
    """Saves WORKDIR/config.json, or refuses a workdir whose saved config differs."""
    path = os.path.join(workdir, "config.json")
    current = config_to_dict(config)
    if os.path.exists(path):
        saved = fileio.read_json(path)
        diff = changed_keys(saved, current)
        if diff and not config.loop.allow_config_change:
            a, b = flatten(saved), flatten(current)
            rows = "\n".join(f"  {k}: saved {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}"
                             for k in diff)
            raise ConfigMismatchError(
                f"Workdir {workdir!r} holds a run with a different config:\n{rows}\n"
                "Use another --workdir for a fresh run, or pass --config.loop.allow_config_change=True "
                "to resume this one with the new values.")
    if jax.process_index() == 0:
        # Written whole then renamed: another process checking it never reads a partial file.
        fileio.write_json(path, current, exact=True)
