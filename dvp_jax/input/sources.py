"""Where examples come from: ``get_source(input_config)`` dispatches on ``input_config.source``.

Every source yields the same elements, in a fixed order, for one process's shard of a split:

  {'image': uint8 [H, W, 3] (decoded RGB; H, W may vary for folder and tfds sources),
   'label': int32 [] (class index into ``SplitInfo.class_names``),
   'index': int64 [] (the example's position in the whole split, 0 <= index < num_examples)}

Shards: process ``p`` of ``P`` gets a contiguous block of the split; the blocks are disjoint,
cover the split exactly and differ in size by at most one example.

Split names: 'train', 'val', 'test' (per source), '+'-unions such as 'train+val' (indices run
through the parts in order) and TFDS-style slices such as 'train[:10%]' or 'val[10:20]'.

Kinds of source:
  * ``IndexedSource`` (digits, synthetic, folder): element ``i`` of a split can be loaded on its
    own (``element_fn``), so the train pipeline shuffles the whole split cheaply by permuting
    indices, and resumes by skipping indices before any decoding.
  * ``TfdsSource``: streams TFDS records; the train pipeline shuffles each process's shard in a
    seeded buffer and skips still-encoded records on resume.
  * ``TfdsSubsetSource`` ('tfds:NAME' with ``input.tfds_train_per_class`` > 0): VIPriors-style
    per-class 'train' / 'val' subsets of the TFDS train split, held encoded in memory (an
    ``IndexedSource``); 'test' is the full TFDS 'test' (or 'validation') split.

Decompression bombs: every decoder call refuses images whose header says more than
``input.max_image_pixels`` pixels (before decoding); such files are skipped and counted
(folder sources) or dropped like undecodable records (TFDS).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import zlib
from typing import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from dvp_jax import errors

AUTOTUNE = tf.data.AUTOTUNE

# File name endings the folder source reads (lower-cased); all are decoded by tf.io.decode_image.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


class DataError(errors.UserError, ValueError):
    """A data set, split, folder or file is missing or unusable; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    num_examples: int  # Examples in the whole split (all processes together).
    num_classes: int
    class_names: tuple[str, ...]


# ----------------------------------------------------------------------------------------------
# Split names and shards.

_PART_RE = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*(?:\[\s*([-+]?\d*%?)\s*:\s*([-+]?\d*%?)\s*\])?\s*$")


def parse_split(split: str) -> list[tuple[str, str | None, str | None]]:
    """'train+val[:10%]' -> [('train', None, None), ('val', None, '10%')]."""
    parts = []
    for part in split.split("+"):
        m = _PART_RE.match(part)
        if not m:
            raise DataError(f"Cannot parse split {split!r}: expected names such as 'train', "
                            f"'train+val' or 'train[:10%]', got the part {part!r}.")
        name, lo, hi = m.groups()
        parts.append((name, lo or None, hi or None))
    return parts


def _bound(spec: str | None, n: int, default: int) -> int:
    """A slice bound: absolute ('10', '-5') or percent ('10%', rounded to the closest example)."""
    if spec is None:
        return default
    if spec.endswith("%"):
        value = int(round(float(spec[:-1]) * n / 100.0))
    else:
        value = int(spec)
    if value < 0:
        value += n
    return min(max(value, 0), n)


def slice_bounds(n: int, lo: str | None, hi: str | None) -> tuple[int, int]:
    """[start, stop) of a slice spec within a split of ``n`` examples."""
    start, stop = _bound(lo, n, 0), _bound(hi, n, n)
    return start, max(start, stop)


def shard_bounds(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, stop) of process ``process_index``'s contiguous block of ``num_examples``."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
    return (num_examples * process_index // process_count,
            num_examples * (process_index + 1) // process_count)


# ----------------------------------------------------------------------------------------------
# Base classes.

class Source:
    """One kind of data; see the module docstring for the elements it yields."""

    def info(self, split: str) -> SplitInfo:
        raise NotImplementedError

    def dataset(self, split: str, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
        raise NotImplementedError


class IndexedSource(Source):
    """A source whose split elements can be loaded one by one from their index."""

    # True when loading may fail at run time (files): the pipelines then drop failing elements.
    may_fail_at_runtime = False

    def element_fn(self, split: str) -> Callable[[tf.Tensor], dict]:
        """Returns f(index: int64 []) -> element dict (see module docstring); usable in tf.data."""
        raise NotImplementedError

    def dataset(self, split: str, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
        n = self.info(split).num_examples
        start, stop = shard_bounds(n, process_index, process_count)
        ds = tf.data.Dataset.range(start, stop).map(
            tf.autograph.experimental.do_not_convert(self.element_fn(split)),
            num_parallel_calls=AUTOTUNE, deterministic=True)
        if self.may_fail_at_runtime:
            ds = ds.ignore_errors(log_warning=True)
        return ds


# ----------------------------------------------------------------------------------------------
# digits: scikit-learn's 1,797 handwritten 8x8 digits.

class DigitsSource(IndexedSource):
    """scikit-learn's handwritten digits (8x8, values 0..16, 10 classes), split per class.

    For each class (in order 0..9) a ``numpy.random.default_rng(split_seed)`` permutation of
    that class's images gives ``digits_train_per_class`` train images, then
    ``digits_val_per_class`` val and ``digits_test_per_class`` test images (disjoint). Each
    split lists its images in the data set's original order. Images are upsampled bilinearly
    (half-pixel centres) to ``digits_image_size`` pixels, scaled 0..16 -> 0..255 (rounded), and
    repeated over 3 identical channels. Class names '0'..'9'.
    """

    SPLITS = ("train", "val", "test")

    def __init__(self, input_config):
        from sklearn.datasets import load_digits
        digits = load_digits()
        self._images = digits.images.astype(np.float32)  # [1797, 8, 8], 0..16.
        self._labels = digits.target.astype(np.int32)
        self._size = int(input_config.get("digits_image_size", 32))
        per_class = {"train": int(input_config.digits_train_per_class),
                     "val": int(input_config.digits_val_per_class),
                     "test": int(input_config.digits_test_per_class)}
        rng = np.random.default_rng(int(input_config.split_seed))
        chosen = {name: [] for name in self.SPLITS}
        needed = sum(per_class.values())
        for c in range(10):
            members = np.flatnonzero(self._labels == c)
            if len(members) < needed:
                raise DataError(
                    f"digits: class {c} has {len(members)} images, fewer than the "
                    f"{needed} requested per class (digits_train_per_class={per_class['train']} + "
                    f"digits_val_per_class={per_class['val']} + "
                    f"digits_test_per_class={per_class['test']}); the smallest class has "
                    f"{np.bincount(self._labels).min()} images.")
            members = rng.permutation(members)
            start = 0
            for name in self.SPLITS:
                chosen[name].append(members[start:start + per_class[name]])
                start += per_class[name]
        self._split_ids = {name: np.sort(np.concatenate(ids)) for name, ids in chosen.items()}

    def split_ids(self, split: str) -> np.ndarray:
        """Positions in ``sklearn.datasets.load_digits()`` of the split's images, int64 [n]."""
        ids = []
        for name, lo, hi in parse_split(split):
            name = "val" if name == "validation" else name
            if name not in self._split_ids:
                raise DataError(f"digits has no split {name!r}; use one of {self.SPLITS} "
                                f"(or a union such as 'train+val').")
            part = self._split_ids[name]
            start, stop = slice_bounds(len(part), lo, hi)
            ids.append(part[start:stop])
        return np.concatenate(ids).astype(np.int64)

    def info(self, split: str) -> SplitInfo:
        return SplitInfo(len(self.split_ids(split)), 10, tuple(str(c) for c in range(10)))

    def element_fn(self, split: str):
        ids = self.split_ids(split)
        images = tf.constant(self._images[ids][..., None])  # [n, 8, 8, 1], 0..16.
        labels = tf.constant(self._labels[ids])
        size = self._size

        def element(index):
            small = tf.gather(images, index)
            big = tf.image.resize(small, [size, size], method="bilinear")
            big = tf.clip_by_value(tf.round(big * (255.0 / 16.0)), 0.0, 255.0)
            image = tf.repeat(tf.cast(big, tf.uint8), 3, axis=-1)
            return {"image": image, "label": tf.gather(labels, index),
                    "index": tf.cast(index, tf.int64)}

        return element


# ----------------------------------------------------------------------------------------------
# synthetic: deterministic random images.

def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8")) & 0x7FFFFFFF


class SyntheticSource(IndexedSource):
    """Deterministic random images, learnable from their colour.

    Any split name works; each has ``synthetic_num_examples`` examples and its own images
    (seeded by a hash of the split name). Label of example ``i`` is ``i % synthetic_num_classes``;
    the image is half uniform noise, half a fixed colour per class, uint8
    [synthetic_image_size (or image_size), same, 3].
    """

    def __init__(self, input_config):
        self._n = int(input_config.synthetic_num_examples)
        self._classes = int(input_config.synthetic_num_classes)
        self._size = int(input_config.get("synthetic_image_size", 0) or input_config.image_size)

    def info(self, split: str) -> SplitInfo:
        n = 0
        for _, lo, hi in parse_split(split):
            start, stop = slice_bounds(self._n, lo, hi)
            n += stop - start
        return SplitInfo(n, self._classes, tuple(str(c) for c in range(self._classes)))

    def element_fn(self, split: str):
        # Map the split's positions to (part seed, example index in that part).
        part_seeds, part_ids = [], []
        for name, lo, hi in parse_split(split):
            start, stop = slice_bounds(self._n, lo, hi)
            part_ids.append(np.arange(start, stop, dtype=np.int64))
            part_seeds.append(np.full(stop - start, _stable_hash(name), np.int64))
        seeds = tf.constant(np.concatenate(part_seeds))
        ids = tf.constant(np.concatenate(part_ids))
        size, classes = self._size, self._classes

        def element(index):
            example = tf.gather(ids, index)
            label = tf.cast(example % classes, tf.int32)
            noise = tf.random.stateless_uniform(
                [size, size, 3], seed=tf.stack([tf.gather(seeds, index), example]),
                minval=0, maxval=256, dtype=tf.int32)
            colour = tf.random.stateless_uniform(
                [3], seed=tf.stack([tf.constant(7919, tf.int64), tf.cast(label, tf.int64)]),
                minval=0, maxval=256, dtype=tf.int32)
            image = tf.cast((noise + colour) // 2, tf.uint8)
            return {"image": image, "label": label, "index": tf.cast(index, tf.int64)}

        return element


# ----------------------------------------------------------------------------------------------
# folder:PATH -- PATH/<split>/<class>/*.JPEG (torchvision ImageFolder layout).

DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # input.max_image_pixels: 120 MB as decoded RGB uint8.


def _header_bytes(data: tf.Tensor, n: int = 32) -> tf.Tensor:
    """The first ``n`` bytes of ``data`` (zero-padded) as int64 [n]."""
    head = tf.strings.substr(tf.strings.join([data, tf.constant(b"\0" * n)]), 0, n)
    return tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)


def encoded_image_pixels(data: tf.Tensor) -> tf.Tensor:
    """Width x height (int64 []) of encoded JPEG / PNG / GIF / BMP / WebP bytes, read from the
    header without decoding; -1 for other or unparsable data (the decoder then decides)."""
    b = _header_bytes(data)

    def le(i, k):
        return sum(b[i + j] * (256 ** j) for j in range(k))

    def be(i, k):
        return sum(b[i + j] * (256 ** (k - 1 - j)) for j in range(k))

    def magic(i, text):
        return tf.reduce_all(tf.equal(b[i:i + len(text)], tf.constant(list(text), tf.int64)))

    bmp_h = le(22, 4)
    bmp_h = tf.abs(tf.where(bmp_h >= 2 ** 31, bmp_h - 2 ** 32, bmp_h))
    vp8l_w = 1 + ((b[22] % 64) * 256 + b[21])
    vp8l_h = 1 + ((b[24] % 16) * 1024 + b[23] * 4 + b[22] // 64)
    webp = magic(0, b"RIFF") & magic(8, b"WEBP")
    pixels = tf.constant(-1, tf.int64)
    pixels = tf.where(magic(0, b"\x89PNG"), be(16, 4) * be(20, 4), pixels)
    pixels = tf.where(magic(0, b"GIF8"), le(6, 2) * le(8, 2), pixels)
    pixels = tf.where(magic(0, b"BM"), le(18, 4) * bmp_h, pixels)
    pixels = tf.where(webp & magic(12, b"VP8X"), (le(24, 3) + 1) * (le(27, 3) + 1), pixels)
    pixels = tf.where(webp & magic(12, b"VP8 "), (le(26, 2) % 16384) * (le(28, 2) % 16384), pixels)
    pixels = tf.where(webp & magic(12, b"VP8L"), vp8l_w * vp8l_h, pixels)
    return tf.cond(magic(0, b"\xff\xd8"),
                   lambda: tf.reduce_prod(tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64)),
                   lambda: pixels)


def decode_image_bytes(data: tf.Tensor, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> uint8 [H, W, 3] (gray, RGBA, CMYK, 16-bit -> RGB).

    An image whose header says more than ``max_pixels`` pixels (a decompression bomb: a 62 kB
    PNG can hold 64 M pixels = 192 MB decoded) raises InvalidArgumentError before decoding;
    pipelines drop such elements like any undecodable one.
    """
    pixels = encoded_image_pixels(data)
    check = tf.debugging.assert_less_equal(
        pixels, tf.constant(int(max_pixels), tf.int64),
        message=f"image larger than input.max_image_pixels={int(max_pixels)}")
    with tf.control_dependencies([check]):
        image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image


# Why a folder-source file is not used (FolderSource.skipped); the first four stop a strict run.
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


# ----------------------------------------------------------------------------------------------
# tfds:NAME

class TfdsSource(Source):
    """A TensorFlow Datasets data set, e.g. 'tfds:cifar10' or 'tfds:imagenet2012'.

    Reads ``input.data_dir`` (TFDS default if ''); never downloads or builds: a data set that is
    not prepared raises DataError with the command that prepares it. 'val' means 'validation'
    when the builder has no 'val' split. Process ``p`` reads its contiguous block of each part of
    the split (``tfds.core.ReadInstruction`` in absolute examples); 'index' = the block's offset in
    the split + the position in TFDS's (deterministic, unshuffled) read order. Image and label
    features: ``input.tfds_image_key`` / ``input.tfds_label_key``. With
    ``input.tfds_train_per_class`` > 0, ``get_source`` returns a ``TfdsSubsetSource`` instead.
    """

    def __init__(self, name: str, input_config):
        import tensorflow_datasets as tfds
        self._tfds = tfds
        self.name = name
        self.data_dir = input_config.data_dir or None
        self.manual_dir = input_config.manual_dir or None
        self.image_key = input_config.get("tfds_image_key", "image")
        self.label_key = input_config.get("tfds_label_key", "label")
        self.max_pixels = int(input_config.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
        try:
            self.builder = tfds.builder(name, data_dir=self.data_dir)
        except Exception as e:  # DatasetNotFoundError and friends.
            raise DataError(f"TFDS data set {name!r} is unknown or cannot be loaded "
                            f"(input.source='tfds:{name}'): {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from e
        if not self._prepared():
            raise DataError(self._not_prepared_message())
        features = self.builder.info.features
        for key in (self.image_key, self.label_key):
            if key not in features:
                raise DataError(f"TFDS data set {name!r} has no feature {key!r} (features: "
                                f"{list(features.keys())}); set input.tfds_image_key / "
                                f"input.tfds_label_key.")

    def _prepared(self) -> bool:
        try:
            return (tf.io.gfile.exists(os.path.join(self.builder.data_dir, "dataset_info.json"))
                    and len(self.builder.info.splits) > 0)
        except Exception:  # pylint: disable=broad-except
            return False

    def _not_prepared_message(self) -> str:
        data_dir = self.data_dir or "~/tensorflow_datasets"
        base = self.name.split(":")[0].split("/")[0]
        msg = (f"TFDS data set {self.name!r} is not prepared in data_dir {data_dir} "
               f"(looked for {self.builder.data_dir}). ")
        if base.startswith("imagenet"):
            manual = self.manual_dir or "<manual_dir>"
            return msg + (
                f"ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar and "
                f"ILSVRC2012_img_val.tar into {manual} (input.manual_dir) and run "
                f"`tfds build {base} --data_dir={data_dir} --manual_dir={manual}`.")
        return msg + (f"Run `tfds build {base} --data_dir={data_dir}` (on a machine with network "
                      f"access, then copy the data_dir here) and set input.data_dir.")

    def _parts(self, split: str) -> list[tuple[str, int, int]]:
        """[(split name, start, stop)] in absolute examples, one per '+'-part."""
        splits = self.builder.info.splits
        parts = []
        for name, lo, hi in parse_split(split):
            if name not in splits and name == "val" and "validation" in splits:
                name = "validation"
            if name not in splits:
                raise DataError(f"TFDS data set {self.name!r} has no split {name!r} "
                                f"(available: {sorted(splits.keys())}).")
            start, stop = slice_bounds(splits[name].num_examples, lo, hi)
            parts.append((name, start, stop))
        return parts

    def info(self, split: str) -> SplitInfo:
        n = sum(stop - start for _, start, stop in self._parts(split))
        label = self.builder.info.features[self.label_key]
        names = tuple(getattr(label, "names", None) or ())
        num_classes = int(getattr(label, "num_classes", len(names)))
        return SplitInfo(n, num_classes, names or tuple(str(c) for c in range(num_classes)))

    def encoded_dataset(self, split: str, process_index: int = 0,
                        process_count: int = 1) -> tf.data.Dataset:
        """Like ``dataset`` but 'image' stays encoded (tf.string): cheap to skip and shuffle."""
        tfds = self._tfds
        offset, pieces = 0, []
        read_config = tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=False)
        for name, start, stop in self._parts(split):
            lo, hi = shard_bounds(stop - start, process_index, process_count)
            if hi > lo:
                instruction = tfds.core.ReadInstruction(name, from_=start + lo, to=start + hi,
                                                        unit="abs")
                ds = self.builder.as_dataset(
                    split=instruction, shuffle_files=False, read_config=read_config,
                    decoders={self.image_key: tfds.decode.SkipDecoding()})
                first = offset + lo
                ds = ds.enumerate(start=first).map(
                    lambda i, ex: {"image": ex[self.image_key],
                                   "label": tf.cast(ex[self.label_key], tf.int32),
                                   "index": tf.cast(i, tf.int64)})
                pieces.append(ds)
            offset += stop - start
        if not pieces:  # This process has no examples (fewer examples than processes).
            return tf.data.Dataset.from_tensor_slices(
                {"image": tf.zeros([0], tf.string), "label": tf.zeros([0], tf.int32),
                 "index": tf.zeros([0], tf.int64)})
        ds = pieces[0]
        for piece in pieces[1:]:
            ds = ds.concatenate(piece)
        return ds

    def decode(self, element: dict) -> dict:
        """Encoded element -> element with 'image' uint8 [H, W, 3] (fails over the pixel cap)."""
        return dict(element, image=decode_image_bytes(element["image"], self.max_pixels))

    def dataset(self, split: str, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
        """Decoded elements; undecodable ones and images over input.max_image_pixels are dropped
        (logged by tf.data)."""
        return self.encoded_dataset(split, process_index, process_count).map(
            tf.autograph.experimental.do_not_convert(self.decode),
            num_parallel_calls=AUTOTUNE, deterministic=True).ignore_errors(log_warning=True)


class TfdsSubsetSource(IndexedSource):
    """VIPriors-style data-deficient splits of a TFDS data set ('tfds:NAME' with
    ``input.tfds_train_per_class`` > 0).

    Splits (plus TFDS-style slices and '+'-unions of them):
      * 'train' / 'val': ``tfds_train_per_class`` / ``tfds_val_per_class`` images per class,
        carved from the TFDS 'train' split, disjoint. The labels of the TFDS train split are read
        once (label feature only); for each class (in label order 0..C-1) a
        ``numpy.random.default_rng(split_seed)`` permutation of that class's TFDS positions
        gives the train images, then the val images. Each split lists its images in TFDS read
        order (positions ascending). A class with fewer than train + val images -> DataError.
      * 'test': the TFDS 'test' split in full ('validation' when the data set has no 'test',
        e.g. imagenet2012); streamed exactly like ``TfdsSource`` when read for evaluation.
    'index' is the position in the dvp_jax split (not the TFDS position; ``split_ids`` maps
    'train' / 'val' to TFDS train positions).

    This is an ``IndexedSource``: the encoded train and val images are held in memory (about
    2.5 kB per CIFAR image, ~110 kB per ImageNet JPEG: meant for subsets up to some 10^4
    images; for ImageNet-sized subsets use the VIPriors folder source,
    ``python -m dvp_jax.input.vipriors``), so the train pipeline shuffles the whole split and
    resumes by index. The encoded images are loaded on first use (a second pass over the TFDS
    train split that keeps only the chosen records); a split containing 'test' is loaded into
    memory only when it is trained on (``element_fn``).
    """

    SPLITS = ("train", "val", "test")
    may_fail_at_runtime = True  # Images over input.max_image_pixels are dropped.

    def __init__(self, name: str, input_config):
        self.tfds = TfdsSource(name, input_config)
        self.name = name
        self.per_class = {"train": int(input_config.tfds_train_per_class),
                          "val": int(input_config.get("tfds_val_per_class", 0) or 0)}
        if self.per_class["train"] <= 0 or self.per_class["val"] < 0:
            raise ValueError(f"input.tfds_train_per_class={self.per_class['train']} must be > 0 "
                             f"and input.tfds_val_per_class={self.per_class['val']} >= 0.")
        self.split_seed = int(input_config.split_seed)
        splits = self.tfds.builder.info.splits
        if "train" not in splits:
            raise DataError(f"TFDS data set {name!r} has no 'train' split to carve "
                            f"input.tfds_train_per_class images per class from (available: "
                            f"{sorted(splits.keys())}).")
        self.test_name = ("test" if "test" in splits else
                          "validation" if "validation" in splits else None)
        self._class_info = self.tfds.info("train")
        labels = self._read_train_labels()
        self._split_ids, self._split_labels = self._choose(labels)
        self._encoded: dict[str, np.ndarray] = {}  # 'train' | 'val' | 'test' -> bytes [n].
        self._test_labels: np.ndarray | None = None

    # -- choosing the subsets --
    def _read_config(self):
        return self.tfds._tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=False)

    def _read_train_labels(self) -> np.ndarray:
        """Labels int64 [N] of the TFDS train split in read order (only the label is parsed)."""
        tfds = self.tfds._tfds
        ds = self.tfds.builder.as_dataset(
            split="train", shuffle_files=False, read_config=self._read_config(),
            decoders=tfds.decode.PartialDecoding({self.tfds.label_key: True}))
        ds = ds.map(lambda ex: tf.cast(ex[self.tfds.label_key], tf.int64)).batch(8192)
        labels = [b for b in ds.as_numpy_iterator()]
        labels = np.concatenate(labels) if labels else np.zeros([0], np.int64)
        expected = self.tfds.builder.info.splits["train"].num_examples
        if len(labels) != expected:
            raise DataError(f"TFDS data set {self.name!r}: read {len(labels)} labels from the "
                            f"'train' split, but its metadata says {expected} examples; the "
                            f"prepared data in {self.tfds.builder.data_dir} looks incomplete.")
        return labels

    def _choose(self, labels: np.ndarray) -> tuple[dict, dict]:
        num_classes = self._class_info.num_classes
        names = self._class_info.class_names
        counts = np.bincount(labels, minlength=num_classes)
        needed = self.per_class["train"] + self.per_class["val"]
        rng = np.random.default_rng(self.split_seed)
        chosen = {"train": [], "val": []}
        for c in range(num_classes):
            members = np.flatnonzero(labels == c)
            if len(members) < needed:
                raise DataError(
                    f"TFDS data set {self.name!r}: class {c} ({names[c]!r}) has {len(members)} "
                    f"images in the TFDS 'train' split, fewer than the {needed} requested per "
                    f"class (input.tfds_train_per_class={self.per_class['train']} + "
                    f"input.tfds_val_per_class={self.per_class['val']}); the smallest class has "
                    f"{int(counts.min())} images.")
            members = rng.permutation(members)
            chosen["train"].append(members[:self.per_class["train"]])
            chosen["val"].append(members[self.per_class["train"]:needed])
        ids = {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in chosen.items()}
        return ids, {k: labels[v].astype(np.int32) for k, v in ids.items()}

    def split_ids(self, name: str) -> np.ndarray:
        """TFDS 'train' positions int64 [n] of the images of 'train' or 'val', ascending."""
        if name not in self._split_ids:
            raise DataError(f"split_ids: use 'train' or 'val', got {name!r}.")
        return self._split_ids[name]

    # -- splits --
    def _size(self, name: str) -> int:
        if name == "test":
            return self.tfds.builder.info.splits[self.test_name].num_examples
        return len(self._split_ids[name])

    def _parts(self, split: str) -> list[tuple[str, int, int]]:
        """[(dvp_jax split name, start, stop)] in positions of that split, one per '+'-part."""
        parts = []
        for name, lo, hi in parse_split(split):
            if name not in self.SPLITS:
                raise DataError(
                    f"TFDS data set {self.name!r} with input.tfds_train_per_class > 0 has the "
                    f"splits 'train' and 'val' (carved per class from the TFDS 'train' split) and "
                    f"'test' (the TFDS {self.test_name or 'test'!r} split); got {name!r} in "
                    f"split {split!r}.")
            if name == "test" and self.test_name is None:
                raise DataError(f"TFDS data set {self.name!r} has neither a 'test' nor a "
                                f"'validation' split for 'test' (available: "
                                f"{sorted(self.tfds.builder.info.splits.keys())}).")
            start, stop = slice_bounds(self._size(name), lo, hi)
            parts.append((name, start, stop))
        return parts

    def info(self, split: str) -> SplitInfo:
        n = sum(stop - start for _, start, stop in self._parts(split))
        return dataclasses.replace(self._class_info, num_examples=n)

    # -- loading --
    def _load_train_subsets(self) -> None:
        """Reads the encoded images of 'train' and 'val' (one pass over the chosen TFDS range)."""
        ids = np.concatenate([self._split_ids["train"], self._split_ids["val"]])
        total = self.tfds.builder.info.splits["train"].num_examples
        keep = np.zeros(total, bool)
        keep[ids] = True
        first, last = int(ids.min()), int(ids.max()) + 1
        tfds = self.tfds._tfds
        ds = self.tfds.builder.as_dataset(
            split=tfds.core.ReadInstruction("train", from_=first, to=last, unit="abs"),
            shuffle_files=False, read_config=self._read_config(),
            decoders={self.tfds.image_key: tfds.decode.SkipDecoding()})
        keep_t = tf.constant(keep)
        ds = ds.enumerate(start=first).filter(lambda i, ex: tf.gather(keep_t, i)).map(
            lambda i, ex: (i, ex[self.tfds.image_key])).batch(1024)
        found = {}
        for positions, images in ds.as_numpy_iterator():
            found.update(zip(positions.tolist(), images))
        missing = [i for i in ids.tolist() if i not in found]
        if missing:
            raise DataError(f"TFDS data set {self.name!r}: could not read {len(missing)} chosen "
                            f"'train' records (e.g. position {missing[0]}).")
        for name in ("train", "val"):
            self._encoded[name] = np.array([found[i] for i in self._split_ids[name].tolist()],
                                           dtype=object)
        nbytes = sum(len(b) for b in found.values())
        logging.info("tfds:%s subsets: %d train + %d val images (%.1f MB encoded) in memory.",
                     self.name, len(self._encoded["train"]), len(self._encoded["val"]), nbytes / 2**20)

    def _load_test(self) -> None:
        ds = self.tfds.encoded_dataset(self.test_name).map(
            lambda el: (el["image"], el["label"])).batch(1024)
        images, labels = [], []
        for im, lab in ds.as_numpy_iterator():
            images += list(im)
            labels.append(lab)
        self._encoded["test"] = np.array(images, dtype=object)
        self._test_labels = (np.concatenate(labels) if labels else np.zeros([0])).astype(np.int32)

    def _arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(encoded images object [n], labels int32 [n]) of 'train', 'val' or 'test'."""
        if name not in self._encoded:
            if name == "test":
                self._load_test()
            else:
                self._load_train_subsets()
        labels = self._test_labels if name == "test" else self._split_labels[name]
        return self._encoded[name], labels

    def element_fn(self, split: str):
        images, labels = [], []
        for name, start, stop in self._parts(split):
            enc, lab = self._arrays(name)
            images.append(enc[start:stop])
            labels.append(lab[start:stop])
        # The encoded images stay in this one Python copy (object [n] of bytes): a tf.constant
        # would add a second copy, and a third inside the serialized tf.data graph.
        images = np.concatenate(images)
        labels = tf.constant(np.concatenate(labels).astype(np.int32))
        max_pixels = self.tfds.max_pixels

        def fetch(index):
            return images[int(index)]

        def element(index):
            data = tf.numpy_function(fetch, [index], tf.string, stateful=False)
            data.set_shape([])
            return {"image": decode_image_bytes(data, max_pixels),
                    "label": tf.gather(labels, index), "index": tf.cast(index, tf.int64)}

        return element

    def dataset(self, split: str, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
        parts = self._parts(split)
        if all(name == "test" for name, _, _ in parts):  # Stream: no test images in memory.
            tfds_split = "+".join(f"{self.test_name}[{start}:{stop}]" for _, start, stop in parts)
            return self.tfds.dataset(tfds_split, process_index, process_count)
        return super().dataset(split, process_index, process_count)


# ----------------------------------------------------------------------------------------------

_DIGITS_CACHE: dict = {}
_TFDS_SUBSET_CACHE: dict = {}


def split_sizes(input_config) -> dict[str, int | str]:
    """{split: examples} of the config's train and eval splits as this process sees them
    (a split it cannot read maps to its error message): what multi-host runs must agree on."""
    source = get_source(input_config)
    sizes = {}
    for key in ("train_split", "eval_split"):
        split = input_config.get(key)
        if split and split not in sizes:
            try:
                sizes[split] = source.info(split).num_examples
            except DataError as e:
                sizes[split] = f"unreadable: {e}"
    return sizes


def get_source(input_config) -> Source:
    """The source named by ``input_config.source``: 'digits' | 'synthetic' | 'tfds:NAME' | 'folder:PATH'."""
    source = str(input_config.source)
    if source == "digits":
        key = (int(input_config.get("digits_image_size", 32)), int(input_config.split_seed),
               int(input_config.digits_train_per_class), int(input_config.digits_val_per_class),
               int(input_config.digits_test_per_class))
        if key not in _DIGITS_CACHE:
            _DIGITS_CACHE[key] = DigitsSource(input_config)
        return _DIGITS_CACHE[key]
    if source == "synthetic":
        return SyntheticSource(input_config)
    if source.startswith("tfds:"):
        name = source[len("tfds:"):]
        if int(input_config.get("tfds_train_per_class", 0) or 0) > 0:
            key = (name, str(input_config.data_dir), str(input_config.get("tfds_image_key", "image")),
                   str(input_config.get("tfds_label_key", "label")), int(input_config.split_seed),
                   int(input_config.tfds_train_per_class),
                   int(input_config.get("tfds_val_per_class", 0) or 0))
            if key not in _TFDS_SUBSET_CACHE:  # Reads the TFDS train labels once per process.
                _TFDS_SUBSET_CACHE[key] = TfdsSubsetSource(name, input_config)
            return _TFDS_SUBSET_CACHE[key]
        return TfdsSource(name, input_config)
    if source.startswith("folder:"):
        return FolderSource(source[len("folder:"):], input_config)
    raise ValueError(f"input.source={source!r}: use 'digits', 'synthetic', 'tfds:NAME' or "
                     f"'folder:PATH'.")
