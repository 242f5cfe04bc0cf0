"""Whole-or-nothing file writes and tolerant reads for everything a run leaves in its workdir.

A kill (SIGKILL, power loss, a full disk) at any moment leaves either the old file or the new
one, never half a file: every write goes to ``<path>.tmp.<pid>`` in the same folder, is
flushed and fsynced, then renamed over ``path`` (``os.replace`` is atomic on POSIX file
systems). Remote paths (``gs://...``) are written in one call by etils.epath (object stores
replace whole objects).

Reads: ``read_json`` turns a damaged JSON file into one ``WorkdirFileError`` naming the file
and what to do; ``read_jsonl`` skips a torn LAST line (a kill during an append) and refuses
damage anywhere else.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

from dvp_jax import errors, jsonfmt


class WorkdirFileError(errors.UserError, ValueError):
    """A file a run wrote earlier cannot be read (truncated, emptied, not JSON)."""


def _is_remote(path: str) -> bool:
    return "://" in os.fspath(path)


def write_atomic(path: str, write: Callable[[Any], None], *, binary: bool = False) -> None:
    """Calls ``write(file_object)`` on a temp file beside ``path``, then renames it to ``path``.

    The folder is created if needed. On any error the temp file is removed and ``path`` is left
    as it was (e.g. ENOSPC: the previous version stays readable).
    """
    path = os.fspath(path)
    if _is_remote(path):
        import io
        from etils import epath
        buffer = io.BytesIO() if binary else io.StringIO()
        write(buffer)
        p = epath.Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        if binary:
            p.write_bytes(buffer.getvalue())
        else:
            p.write_text(buffer.getvalue())
        return
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def write_text(path: str, text: str) -> None:
    """``text`` to ``path``, whole or not at all."""
    write_atomic(path, lambda f: f.write(text))


def write_json(path: str, obj: Any, *, indent: int | None = 2, sort_keys: bool = True,
               exact: bool = False) -> None:
    """``obj`` as JSON (plus a final newline) to ``path``, whole or not at all. Floats are
    rounded by ``jsonfmt.rounded`` unless ``exact`` (config.json, compared key by key)."""
    text = json.dumps(obj if exact else jsonfmt.rounded(obj), indent=indent, sort_keys=sort_keys)
    write_text(path, text + "\n")


def save_figure(fig, path: str, **savefig_kwargs) -> None:
    """A matplotlib figure to ``path`` (format from the extension), whole or not at all."""
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    write_atomic(path, lambda f: fig.savefig(f, format=fmt, **savefig_kwargs), binary=True)


def append_line(path: str, line: str) -> None:
    """Appends one line (JSONL records). A kill can tear only this last line: readers skip it,
    and the next append first cuts such a torn tail (an incomplete record) back to the last
    newline, so every complete record stays and each new one starts its own line."""
    with open(path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(max(0, end - 65536))
            tail = f.read()
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                f.truncate(end - len(tail) + cut + 1 if cut >= 0 else (0 if end <= 65536 else end))
        f.write(line.rstrip("\n").encode() + b"\n")
        f.flush()


def read_json(path: str) -> Any:
    """The JSON in ``path``; WorkdirFileError (one clear line) if it is damaged."""
    from etils import epath
    try:
        text = epath.Path(path).read_text()
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkdirFileError(
            f"{path} is damaged ({e.__class__.__name__}: {e}); it was left by an interrupted "
            f"write of an older version. Move it away (e.g. mv {path} {path}.damaged) and rerun: "
            f"it is written again.") from e


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSONL file ([] if absent). A torn last line is skipped (a kill during
    an append); damage on any other line raises WorkdirFileError naming the line."""
    if not os.path.exists(path):
        return []
    with open(path, errors="replace") as f:
        numbered = [(i, line) for i, line in enumerate(f.read().split("\n"), 1) if line.strip()]
    records = []
    for pos, (number, line) in enumerate(numbered):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if pos == len(numbered) - 1:
                break  # The torn last record of a killed run.
            raise WorkdirFileError(f"{path} line {number} is damaged ({e}); move the file away "
                                   f"to start a new log.") from e
    return records
