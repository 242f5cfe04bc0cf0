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
(the challenge's official lists converted to this form). ``--write_file_lists`` records the lists
that were used in OUT/train.txt, OUT/val.txt (OUT/test.txt), in that same form.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import zlib

import numpy as np

from dvp_jax import console, errors

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
    if not os.path.isfile(path):
        raise BuildError(f"File list {path} does not exist.")
    with open(path) as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


def _materialise(entries: list[str], source_root: str, out_dir: str, copy: bool) -> None:
    missing = [e for e in entries if not os.path.isfile(os.path.join(source_root, e))]
    if missing:
        raise BuildError(f"{len(missing)} listed file(s) do not exist under {source_root}, e.g. "
                         f"{missing[:3]}.")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise BuildError(f"{out_dir} already exists and is not empty; choose a new --out.")
    for entry in entries:
        src = os.path.abspath(os.path.join(source_root, entry))
        dst = os.path.join(out_dir, entry)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
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
    os.makedirs(out, exist_ok=True)
    for split, entries in lists.items():
        _materialise(entries, roots[split], os.path.join(out, split), copy)
    if write_file_lists:
        for split, entries in lists.items():
            with open(os.path.join(out, f"{split}.txt"), "w") as f:
                f.write("".join(f"{e}\n" for e in entries))
    return lists


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imagenet_train", required=True, help="ImageNet train folder DIR/<wnid>/*.JPEG")
    parser.add_argument("--out", required=True, help="Output folder (train/, val/, test/)")
    parser.add_argument("--per_class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--file_lists", default=None, help="Folder with train.txt, val.txt [test.txt]")
    parser.add_argument("--imagenet_val", default=None, help="ImageNet val folder DIR/<wnid>/*.JPEG")
    parser.add_argument("--copy", action="store_true", help="Copy files instead of symlinking")
    parser.add_argument("--write_file_lists", action="store_true",
                        help="Record the chosen lists in OUT/train.txt, OUT/val.txt [OUT/test.txt]")
    console.add_verbosity_argument(parser)
    args = parser.parse_args(argv)
    console.setup(args.verbosity)
    try:
        lists = build_subset(args.imagenet_train, args.out, per_class=args.per_class,
                             seed=args.seed, file_lists=args.file_lists,
                             imagenet_val=args.imagenet_val, copy=args.copy,
                             write_file_lists=args.write_file_lists)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(", ".join(f"{split}: {len(entries)} images" for split, entries in lists.items())
          + f" -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
