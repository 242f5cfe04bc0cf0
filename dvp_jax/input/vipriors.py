"""Builds the VIPriors image-classification subset of ImageNet as image folders.

    python -m dvp_jax.input.vipriors --imagenet_train /data/imagenet/train --out /data/vipriors \
        [--per_class 50] [--seed 0] [--imagenet_val /data/imagenet/val] [--copy] \
        [--write_file_lists] [--file_lists DIR_WITH_train.txt_val.txt]

Writes OUT/train/<wnid>/ and OUT/val/<wnid>/ with ``per_class`` distinct images per class each,
drawn from ImageNet's train folder (DIR/<wnid>/*.JPEG), and optionally OUT/test/<wnid>/ from
ImageNet's val folder sorted into class sub-folders (DIR/<wnid>/*.JPEG). Files are symlinks to
the originals (absolute paths) unless ``--copy``. Read the result with
``input.source = 'folder:OUT'``.

Selection (without ``--file_lists``): per class, the class's files are sorted by name and
permuted by ``numpy.random.default_rng([seed, crc32(wnid)])``; the first ``per_class`` go to
train, the next ``per_class`` to val (test: the first ``per_class`` of the permuted val files).
The same seed and folders give the same subset, independent of which other classes exist.

``--file_lists DIR`` instead reads DIR/train.txt, DIR/val.txt (and DIR/test.txt if present and
``--imagenet_val`` is given): one ``wnid/file.JPEG`` per line, relative to the ImageNet folder
(the challenge's official lists converted to this form). Entries must stay inside the folder
(absolute paths, '..' and duplicates are refused, naming the line). ``--write_file_lists`` records the lists
that were used in OUT/train.txt, OUT/val.txt (OUT/test.txt), in that same form.

OUT must be new or empty. The subset is built in a temporary folder next to OUT and renamed to
OUT at the end, so an interrupted build never leaves a half-built OUT.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import zlib

import numpy as np
from absl import flags

from dvp_jax import cli, console, errors

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class BuildError(errors.UserError, ValueError):
    """A folder is missing, a class has too few images, or a listed file does not exist."""


def _classes(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise BuildError(f"ImageNet folder {root} does not exist (expected {root}/<wnid>/*.JPEG).")
    classes = sorted(d for d in os.listdir(root)
                     if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise BuildError(f"ImageNet folder {root} has no class sub-folders "
                         f"(expected {root}/<wnid>/*.JPEG).")
    return classes


def _images(root: str, wnid: str) -> list[str]:
    folder = os.path.join(root, wnid)
    return sorted(f for f in os.listdir(folder)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))


def _permuted(files: list[str], seed: int, wnid: str) -> list[str]:
    rng = np.random.default_rng([seed, zlib.crc32(wnid.encode("utf-8"))])
    return [files[i] for i in rng.permutation(len(files))]


def choose_train_val(imagenet_train: str, per_class: int = 50, seed: int = 0) -> dict[str, list[str]]:
    """{'train': [...], 'val': [...]} of 'wnid/file' paths, ``per_class`` per class each, disjoint."""
    lists = {"train": [], "val": []}
    for wnid in _classes(imagenet_train):
        files = _images(imagenet_train, wnid)
        if len(files) < 2 * per_class:
            raise BuildError(f"Class {wnid} has {len(files)} images in {imagenet_train}/{wnid}, "
                             f"fewer than the {2 * per_class} needed ({per_class} train + "
                             f"{per_class} val); lower --per_class.")
        chosen = _permuted(files, seed, wnid)
        lists["train"] += [f"{wnid}/{f}" for f in sorted(chosen[:per_class])]
        lists["val"] += [f"{wnid}/{f}" for f in sorted(chosen[per_class:2 * per_class])]
    return lists


def choose_test(imagenet_val: str, per_class: int = 50, seed: int = 0) -> list[str]:
    """'wnid/file' paths of ``per_class`` images per class from ImageNet's val folder."""
    out = []
    for wnid in _classes(imagenet_val):
        files = _images(imagenet_val, wnid)
        if len(files) < per_class:
            raise BuildError(f"Class {wnid} has {len(files)} images in {imagenet_val}/{wnid}, "
                             f"fewer than the {per_class} needed for test; lower --per_class.")
        out += [f"{wnid}/{f}" for f in sorted(_permuted(files, seed, wnid)[:per_class])]
    return out


def read_file_list(path: str) -> list[str]:
    """The entries of a file list (blank lines and '#' comments skipped), checked line by line.

    Every entry must be a relative 'wnid/file' path that stays inside its folder (no absolute
    paths, no '..', no empty parts) and appear once; otherwise BuildError names the line.
    """
    if not os.path.isfile(path):
        raise BuildError(f"File list {path} does not exist.")
    entries, seen = [], {}
    with open(path) as f:
        for number, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.replace("\\", "/").split("/")
            if (os.path.isabs(line) or line.startswith(("/", "\\")) or ":" in parts[0]
                    or any(p in ("", ".", "..") for p in parts)):
                raise BuildError(f"{path} line {number}: {line!r} is not a relative "
                                 f"'wnid/file.JPEG' path inside the ImageNet folder (absolute "
                                 f"paths, '..' and empty parts are refused); fix the line.")
            if line in seen:
                raise BuildError(f"{path} line {number}: {line!r} is listed twice (first on line "
                                 f"{seen[line]}); remove the duplicate.")
            seen[line] = number
            entries.append(line)
    return entries


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` resolves (symlinks followed) to ``root`` or below it."""
    root = os.path.realpath(root)
    return os.path.commonpath([os.path.realpath(path), root]) == root


def _materialise(entries: list[str], source_root: str, out_dir: str, copy: bool) -> None:
    """Links (or copies) every 'wnid/file' entry of ``source_root`` to ``out_dir``/entry.

    Sources must resolve inside ``source_root`` and targets inside ``out_dir`` (a symlinked
    class folder pointing elsewhere is refused); existing targets are never overwritten.
    """
    missing = [e for e in entries if not os.path.isfile(os.path.join(source_root, e))]
    if missing:
        raise BuildError(f"{len(missing)} listed file(s) do not exist under {source_root}, e.g. "
                         f"{missing[:3]}.")
    for entry in entries:
        src = os.path.abspath(os.path.join(source_root, entry))
        dst = os.path.join(out_dir, entry)
        if not _inside(src, source_root):
            raise BuildError(f"Listed file {entry!r} resolves to {os.path.realpath(src)}, outside "
                             f"{source_root}; list files inside the ImageNet folder only.")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not _inside(os.path.dirname(dst), out_dir) or os.path.lexists(dst):
            raise BuildError(f"Cannot write {entry!r}: {dst} would be outside {out_dir} or "
                             f"already exists; fix the file list.")
        if copy:
            shutil.copy2(src, dst)
        else:
            os.symlink(src, dst)


def build_subset(imagenet_train: str, out: str, *, per_class: int = 50, seed: int = 0,
                 file_lists: str | None = None, imagenet_val: str | None = None,
                 copy: bool = False, write_file_lists: bool = False) -> dict[str, list[str]]:
    """Writes OUT/{train,val[,test]}/<wnid>/...; returns the 'wnid/file' lists used per split."""
    for folder in (imagenet_train, imagenet_val):
        if folder and not os.path.isdir(folder):
            raise BuildError(f"ImageNet folder {folder} does not exist "
                             f"(expected {folder}/<wnid>/*.JPEG).")
    if file_lists:
        lists = {"train": read_file_list(os.path.join(file_lists, "train.txt")),
                 "val": read_file_list(os.path.join(file_lists, "val.txt"))}
        if imagenet_val and os.path.isfile(os.path.join(file_lists, "test.txt")):
            lists["test"] = read_file_list(os.path.join(file_lists, "test.txt"))
        overlap = set(lists["train"]) & set(lists["val"])
        if overlap:
            raise BuildError(f"train.txt and val.txt share {len(overlap)} files, e.g. "
                             f"{sorted(overlap)[:3]}.")
    else:
        lists = choose_train_val(imagenet_train, per_class, seed)
    if imagenet_val and "test" not in lists:
        lists["test"] = choose_test(imagenet_val, per_class, seed)
    roots = {"train": imagenet_train, "val": imagenet_train, "test": imagenet_val}
    out = os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out):
        raise BuildError(f"{out} already exists and is not empty; choose a new --out.")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise BuildError(f"{out} exists and is not a folder; choose a new --out.")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    # Built in a temporary sibling folder and renamed at the end: a crash never leaves a
    # half-built OUT that later looks complete.
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.building-", dir=parent)
    try:
        for split, entries in lists.items():
            _materialise(entries, roots[split], os.path.join(staging, split), copy)
        if write_file_lists:
            for split, entries in lists.items():
                with open(os.path.join(staging, f"{split}.txt"), "w") as f:
                    f.write("".join(f"{e}\n" for e in entries))
        if os.path.isdir(out):
            os.rmdir(out)  # Empty (checked above); os.rename cannot replace it otherwise.
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return lists


PROG = "python -m dvp_jax.input.vipriors"
FLAGS = flags.FlagValues()
flags.DEFINE_string("imagenet_train", None, "ImageNet train folder DIR/<wnid>/*.JPEG",
                    flag_values=FLAGS, required=True)
flags.DEFINE_string("out", None, "Output folder (train/, val/, test/)", flag_values=FLAGS,
                    required=True)
flags.DEFINE_integer("per_class", 50, "Images per class in train and in val (and test)",
                     flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of the selection", flag_values=FLAGS)
flags.DEFINE_string("file_lists", None, "Folder with train.txt, val.txt [test.txt]",
                    flag_values=FLAGS)
flags.DEFINE_string("imagenet_val", None, "ImageNet val folder DIR/<wnid>/*.JPEG",
                    flag_values=FLAGS)
flags.DEFINE_boolean("copy", False, "Copy files instead of symlinking", flag_values=FLAGS)
flags.DEFINE_boolean("write_file_lists", False,
                     "Record the chosen lists in OUT/train.txt, OUT/val.txt [OUT/test.txt]",
                     flag_values=FLAGS)
cli.define_verbosity(FLAGS)


def _build(args) -> int:
    lists = build_subset(args.imagenet_train, args.out, per_class=args.per_class,
                         seed=args.seed, file_lists=args.file_lists,
                         imagenet_val=args.imagenet_val, copy=args.copy,
                         write_file_lists=args.write_file_lists)
    print(", ".join(f"{split}: {len(entries)} images" for split, entries in lists.items())
          + f" -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0, or 2 after a one-line error (BuildError and other user errors)."""
    args = cli.parse(FLAGS, argv, prog=PROG, doc=__doc__)
    console.setup(args.verbosity)
    return cli.run(lambda: _build(args))


if __name__ == "__main__":
    sys.exit(main())
