"""'folder:PATH': PATH/<split>/<class>/*.JPEG (torchvision ImageFolder layout), with an
up-front check of every file (cached per file in the user cache dir) and skipped files counted.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import zlib

import numpy as np
import tensorflow as tf
from absl import logging

from dvp_jax.errors import DataError
from dvp_jax.input.decode import DEFAULT_MAX_IMAGE_PIXELS, decode_image_bytes, encoded_image_pixels
from dvp_jax.input.source_base import AUTOTUNE, IndexedSource, SplitInfo
from dvp_jax.input.splits import parse_split, slice_bounds

# File name endings the folder source reads (lower-cased); all are decoded by tf.io.decode_image.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

UNDECODABLE, TOO_LARGE, READ_ERROR, BROKEN_LINK, UNKNOWN_EXTENSION = (
    "undecodable", "larger than input.max_image_pixels", "read error (not remembered)",
    "broken symlink", "unknown extension")


def check_image_files(paths: list[str], max_pixels: int) -> dict[str, tuple[str, int]]:
    """{path: (status, pixels)} for every path; status 'ok', UNDECODABLE, TOO_LARGE or READ_ERROR.

    One parallel tf.data pass (the decoder the pipeline uses; images over ``max_pixels`` by their
    header are not decoded). Files that fail there are retried one by one, so a read error
    (I/O, permissions: possibly transient) is told apart from undecodable content.
    """
    if not paths:
        return {}

    def check(i, path):
        data = tf.io.read_file(path)
        pixels = encoded_image_pixels(data)
        decodable = tf.cond(pixels > max_pixels, lambda: tf.constant(False),
                            lambda: tf.size(decode_image_bytes(data, max_pixels)) >= 0)
        return i, pixels, decodable

    ds = tf.data.Dataset.from_tensor_slices((tf.range(len(paths), dtype=tf.int64), paths))
    ds = ds.map(check, num_parallel_calls=AUTOTUNE, deterministic=False).ignore_errors()
    result = {}
    done, every = 0, max(1, len(paths) // 10)
    for ids, pixels, ok in ds.batch(1024).as_numpy_iterator():
        for i, px, good in zip(ids.tolist(), pixels.tolist(), ok.tolist()):
            result[paths[i]] = ("ok" if good else TOO_LARGE, px)
        if len(paths) >= 10_000 and (done + len(ids)) // every > done // every:
            logging.info("folder source: checked %d / %d files.", done + len(ids), len(paths))
        done += len(ids)
    for path in paths:
        if path in result:
            continue
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            result[path] = (READ_ERROR, -1)
            continue
        try:
            pixels = int(encoded_image_pixels(tf.constant(data)))
            if pixels > max_pixels:
                result[path] = (TOO_LARGE, pixels)
                continue
            decode_image_bytes(tf.constant(data), max_pixels)
            result[path] = ("ok", pixels)  # Failed before, decodes now: a transient error.
        except (tf.errors.OpError, ValueError):
            result[path] = (UNDECODABLE, -1)
    return result


def user_cache_dir() -> str:
    """$XDG_CACHE_HOME/dvp_jax (default ~/.cache/dvp_jax): caches that never go into data sets."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dvp_jax")


class FolderSource(IndexedSource):
    """Images in ``PATH/<split>/<class>/<file>`` (torchvision ImageFolder layout).

    Class names: the sorted sub-folders of ``PATH/train``; label = position in that list. Every
    other split must have exactly the same class folders. Within a split, examples are ordered
    by class, then by file name. Hidden files and folders are ignored.

    Skipped files are counted and reported (one warning per split, ``skipped(split)``): names
    not ending in one of IMAGE_EXTENSIONS (case-insensitive), broken symlinks, and (with
    validation) undecodable files, images over ``input.max_image_pixels`` (by their header; never
    decoded) and files that could not be read. With ``input.strict`` = True any skipped image
    file (all but unknown extensions) stops the run with a DataError naming it.

    Validation (``input.folder_validate``): 'cached' (default) checks every file once, in
    parallel, when a split is first listed, and remembers the outcome per file (size, mtime) in
    a cache file under the user cache dir ($XDG_CACHE_HOME/dvp_jax, never in PATH), so later
    starts check only new or changed files; read errors (possibly transient) are never
    remembered. 'decode' checks every start without a cache. 'none' checks nothing up front
    (lazy): a file that fails is dropped at run time by tf.data's ignore_errors (logged by
    TensorFlow), as is any file that breaks after the check, so an epoch never crashes.
    """

    may_fail_at_runtime = True
    CACHE_FORMAT = 2
    _listing_cache: dict = {}  # (root, split, strict, validate, max_pixels) -> listing; per process.

    def __init__(self, root: str, input_config):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.strict = bool(input_config.strict)
        self.validate = str(input_config.get("folder_validate", "cached"))
        self.max_pixels = int(input_config.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
        if self.validate not in ("cached", "decode", "none"):
            raise ValueError(f"input.folder_validate={self.validate!r}: use 'cached', 'decode' or 'none'.")
        if not os.path.isdir(self.root):
            raise DataError(
                f"folder source: {self.root} does not exist (input.source='folder:{root}'). "
                f"Expected the ImageFolder layout {self.root}/<split>/<class>/<image>.JPEG, "
                f"e.g. as written by `python -m dvp_jax.input.vipriors`.")
        self._class_names: tuple[str, ...] | None = None

    # -- listing --
    def _split_dir(self, name: str) -> str:
        path = os.path.join(self.root, name)
        if not os.path.isdir(path):
            found = sorted(d for d in os.listdir(self.root)
                           if os.path.isdir(os.path.join(self.root, d)) and not d.startswith("."))
            raise DataError(f"folder source: split {name!r} not found: {path} does not exist "
                            f"(splits found in {self.root}: {found}).")
        return path

    @staticmethod
    def _subfolders(path: str) -> list[str]:
        return sorted(d for d in os.listdir(path)
                      if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))

    @property
    def class_names(self) -> tuple[str, ...]:
        if self._class_names is None:
            train = self._split_dir("train")
            names = self._subfolders(train)
            if not names:
                raise DataError(f"folder source: {train} has no class folders; expected "
                                f"{train}/<class>/<image>.JPEG.")
            self._class_names = tuple(names)
        return self._class_names

    def _list_files(self, name: str) -> tuple[list[str], list[int], dict[str, list[str]]]:
        """(image files, labels, {reason: skipped paths}) of split ``name`` before validation,
        ordered by class then name."""
        split_dir = self._split_dir(name)
        classes = self.class_names
        found = self._subfolders(split_dir)
        if tuple(found) != classes:
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise DataError(
                f"folder source: the classes of split {name!r} differ from train's "
                f"({len(found)} vs {len(classes)} class folders): missing from {name!r}: "
                f"{missing[:10]}{' ...' if len(missing) > 10 else ''}; not in train: "
                f"{extra[:10]}{' ...' if len(extra) > 10 else ''}.")
        paths, labels = [], []
        skipped = {BROKEN_LINK: [], UNKNOWN_EXTENSION: []}
        for label, cls in enumerate(classes):
            cls_dir = os.path.join(split_dir, cls)
            files = []
            for f in sorted(os.listdir(cls_dir)):
                path = os.path.join(cls_dir, f)
                if f.startswith(".") or os.path.isdir(path):
                    continue
                if not os.path.exists(path):  # A symlink to nothing.
                    skipped[BROKEN_LINK].append(path)
                elif not f.lower().endswith(IMAGE_EXTENSIONS):
                    skipped[UNKNOWN_EXTENSION].append(path)
                else:
                    files.append(path)
            if not files:
                raise DataError(f"folder source: class folder {cls_dir} has no image files "
                                f"(looked for {', '.join(IMAGE_EXTENSIONS)}).")
            paths += files
            labels += [label] * len(files)
        return paths, labels, skipped

    def cache_path(self) -> str:
        """The 'cached' validation file of this folder (in the user cache dir, keyed by PATH)."""
        key = zlib.crc32(self.root.encode("utf-8"))
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(self.root) or "root")
        return os.path.join(user_cache_dir(), "folder_checks", f"{name}-{key:08x}.json")

    def _statuses(self, paths: list[str]) -> dict[str, str]:
        """{path: status} (see check_image_files) of every path, using the cache if 'cached'."""
        if self.validate == "none":
            return {}
        if self.validate == "decode":
            return {p: st for p, (st, _) in check_image_files(paths, self.max_pixels).items()}
        cache_path = self.cache_path()
        try:
            with open(cache_path) as f:
                saved = json.load(f)
            cache = saved["files"] if saved.get("format") == self.CACHE_FORMAT else {}
        except (OSError, ValueError, KeyError):
            cache = {}
        statuses, todo, stamps = {}, [], {}
        for p in paths:
            st = os.stat(p)
            stamps[p] = [st.st_size, st.st_mtime_ns]
            entry = cache.get(p)
            if entry is None or entry[:2] != stamps[p]:
                todo.append(p)
            elif entry[2] == UNDECODABLE:
                statuses[p] = UNDECODABLE
            elif entry[3] > self.max_pixels:
                statuses[p] = TOO_LARGE
            elif entry[2] == "ok":
                statuses[p] = "ok"
            else:  # Too large under a smaller cap, not decoded yet.
                todo.append(p)
        if todo:
            for p, (status, pixels) in check_image_files(todo, self.max_pixels).items():
                statuses[p] = status
                if status != READ_ERROR:  # Possibly transient: checked again next time.
                    cache[p] = stamps[p] + [status, pixels]
            try:  # Unique temporary name, then an atomic rename: concurrent writers are safe.
                os.makedirs(os.path.dirname(cache_path), exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=os.path.basename(cache_path) + ".",
                                           suffix=".tmp", dir=os.path.dirname(cache_path))
                with os.fdopen(fd, "w") as f:
                    json.dump({"format": self.CACHE_FORMAT, "files": cache}, f)
                os.replace(tmp, cache_path)
            except OSError as e:
                logging.info("folder source: cannot write %s (%s); files will be checked again "
                             "next run.", cache_path, e)
        return statuses

    def _listing(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        key = (self.root, name, self.strict, self.validate, self.max_pixels)
        if key not in self._listing_cache:
            paths, labels, skipped = self._list_files(name)
            statuses = self._statuses(paths)
            for reason in (UNDECODABLE, TOO_LARGE, READ_ERROR):
                skipped[reason] = [p for p in paths if statuses.get(p, "ok") == reason]
            skipped = {r: v for r, v in skipped.items() if v}
            if self.strict:
                for reason, files in skipped.items():
                    if reason != UNKNOWN_EXTENSION:
                        raise DataError(
                            f"folder source: cannot use {files[0]}: {reason} (input.strict=True; "
                            f"{len(files)} such file(s) in split {name!r}). Remove or replace it, "
                            f"or set input.strict=False to skip and count such files.")
            if skipped:
                logging.warning(
                    "folder source: skipped %d file(s) in %s: %s. Set input.strict=True to stop "
                    "on unusable image files instead.", sum(map(len, skipped.values())),
                    os.path.join(self.root, name),
                    "; ".join(f"{len(v)} {r} (e.g. {', '.join(v[:3])})" for r, v in skipped.items()))
            bad = {p for p in paths if statuses.get(p, "ok") != "ok"}
            if bad:
                keep = [i for i, p in enumerate(paths) if p not in bad]
                kept_labels = {labels[i] for i in keep}
                for label, cls in enumerate(self.class_names):
                    if label not in kept_labels:
                        raise DataError(f"folder source: class folder "
                                        f"{os.path.join(self.root, name, cls)} has no readable images.")
                paths = [paths[i] for i in keep]
                labels = [labels[i] for i in keep]
            self._listing_cache[key] = (np.asarray(paths, dtype=object),
                                        np.asarray(labels, dtype=np.int32), skipped)
        return self._listing_cache[key][:2]

    def skipped(self, split: str) -> dict[str, list[str]]:
        """{reason: paths} of the files of ``split``'s parts that are not used (see class doc)."""
        out: dict[str, list[str]] = {}
        for name, _, _ in parse_split(split):
            self._listing(name)
            key = (self.root, name, self.strict, self.validate, self.max_pixels)
            for reason, files in self._listing_cache[key][2].items():
                out.setdefault(reason, []).extend(files)
        return out

    def files(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(paths: object [n], labels: int32 [n]) of the split, in element order."""
        paths, labels = [], []
        for name, lo, hi in parse_split(split):
            p, l = self._listing(name)
            start, stop = slice_bounds(len(p), lo, hi)
            paths.append(p[start:stop])
            labels.append(l[start:stop])
        return np.concatenate(paths), np.concatenate(labels)

    def info(self, split: str) -> SplitInfo:
        paths, _ = self.files(split)
        return SplitInfo(len(paths), len(self.class_names), self.class_names)

    def element_fn(self, split: str):
        paths, labels = self.files(split)
        paths = tf.constant([str(p) for p in paths], tf.string)
        labels = tf.constant(labels)
        max_pixels = self.max_pixels

        def element(index):
            image = decode_image_bytes(tf.io.read_file(tf.gather(paths, index)), max_pixels)
            return {"image": image, "label": tf.gather(labels, index),
                    "index": tf.cast(index, tf.int64)}

        return element

