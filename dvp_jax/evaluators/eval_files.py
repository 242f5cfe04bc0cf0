"""The files evaluations leave in a workdir: eval_<split>.json and best_<split>.json.

WORKDIR/eval_<split>.json: the latest evaluation of a split (after training: the "final"
accuracy). WORKDIR/best_<split>.json: the evaluation with the highest top-1 so far, the
reference code's "best val epoch" protocol ({'top1', 'top5', 'step', 'epoch', 'label', ...}).
Split names become file-safe with ``split_tag``. ``python -m dvp_jax.evaluate`` writes
WORKDIR/eval_<split>[_tencrop][_ensemble].json (``offline_eval_path``). Every eval and best
JSON is written by ``write_json`` (process 0 only).
"""
from __future__ import annotations

import os
import re

import jax

from dvp_jax import fileio


def split_tag(split: str) -> str:
    """A file- and metric-name-safe form of a split name ('val[:10%]' -> 'val__10__')."""
    return re.sub(r"[^A-Za-z0-9_+.-]", "_", split)


def write_json(path: str, result: dict) -> str:
    """Writes ``result`` as indented JSON to ``path`` (local or gs://, parent folders created;
    process 0 only); returns the path."""
    if jax.process_index() == 0:
        fileio.write_json(path, result)
    return path


def write_eval_json(workdir: str, result: dict) -> str:
    """Writes ``result`` to WORKDIR/eval_<split>.json (process 0 only); returns the path."""
    return write_json(os.path.join(workdir, f"eval_{split_tag(result['split'])}.json"), result)


def offline_eval_path(workdir: str, split: str, *, ten_crop: bool = False,
                      ensemble: bool = False) -> str:
    """WORKDIR/eval_<split>[_tencrop][_ensemble].json, the offline evaluation's default output.

    Its split names keep the command line's historical rule (characters outside [\\w+-] ->
    '_', so '.' too), which differs from ``split_tag`` only for '.' and non-ASCII letters."""
    name = "eval_" + re.sub(r"[^\w+\-]", "_", split)
    name += ("_tencrop" if ten_crop else "") + ("_ensemble" if ensemble else "")
    return os.path.join(workdir, name + ".json")


BEST_LABEL = "best val epoch (reference protocol)"


def best_json_path(workdir: str, split: str) -> str:
    """WORKDIR/best_<split>.json: the evaluation with the highest top-1 so far."""
    return os.path.join(workdir, f"best_{split_tag(split)}.json")


def read_best(workdir: str, split: str) -> dict | None:
    """The best-epoch record of ``split`` in ``workdir`` (None if there is none)."""
    path = best_json_path(workdir, split)
    if not os.path.exists(path):
        return None
    return fileio.read_json(path)


def better_or_equal(result: dict, best: dict | None) -> bool:
    """The reference's rule (``is_best = err1 <= best_err1``): a tie moves the best to the
    later evaluation, and top-5 is the best epoch's top-5, not the maximum."""
    return best is None or result["top1"] >= best["top1"]


class BestEpoch:
    """Keeps the best evaluation of one split: ``tracker(result) -> best so far``.

    result: {'top1', 'top5', 'step', ...}. The first call resumes WORKDIR/best_<split>.json
    (a record from a later step than ``result`` is stale and dropped); every new best is
    written there (process 0). ``workdir`` None: memory only.
    """

    def __init__(self, workdir: str | None, split: str):
        self.workdir, self.split = workdir, split
        self.best: dict | None = None
        self.started = False

    def __call__(self, result: dict) -> dict:
        if not self.started:
            self.started = True
            saved = read_best(self.workdir, self.split) if self.workdir else None
            self.best = saved if saved and saved["step"] <= result["step"] else None
        if better_or_equal(result, self.best):
            self.best = result
            if self.workdir is not None:
                write_json(best_json_path(self.workdir, self.split), result)
        return self.best
