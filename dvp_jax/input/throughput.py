"""Measures the input pipeline's throughput (images per second, on this host's CPUs).

    python -m dvp_jax.input.throughput --make_jpegs /tmp/dvp_jpegs --source folder:/tmp/dvp_jpegs \
        --transform moco_v2 --image_size 224 --global_batch 64 --num_batches 8 --repeats 3

``measure`` is what ``dvp_jax.benchmark`` calls: it builds the train iterator, takes one batch
(warm-up: graph building, first file reads, tf.data autotuning), then times ``num_batches``
batches. An "image" is one example; for 'moco_v2' each example is two augmented views.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np
from absl import flags

from dvp_jax import cli


def measure(input_config, split: str, transform: str, global_batch: int, image_size: int,
            num_batches: int) -> dict:
    """One timed run: {'images_per_s', 'images_per_cpu_s', 'seconds', 'num_images', 'warmup_s'}.

    images_per_cpu_s counts this process's CPU time (all threads): less sensitive than wall time
    to other programs sharing the machine; times the number of cores it bounds images_per_s.
    """
    from dvp_jax.input import pipeline
    start = time.perf_counter()
    iterator = pipeline.make_train_iterator(
        input_config, split, transform, global_batch=global_batch, seed=0,
        image_size=image_size, process_index=0, process_count=1)
    next(iterator)
    warmup = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        next(iterator)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    images = num_batches * global_batch
    return {"images_per_s": images / seconds, "images_per_cpu_s": images / cpu_seconds,
            "seconds": seconds, "num_images": images, "warmup_s": warmup}


def make_jpegs(folder: str, num_images: int = 500, num_classes: int = 10, seed: int = 0,
               sizes: tuple[int, int] = (256, 400)) -> None:
    """Writes ``num_images`` random JPEGs (sides uniform in ``sizes``) to folder/train/<class>/."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        h, w = rng.integers(sizes[0], sizes[1] + 1, size=2)
        # Smooth random content (low-res noise, upsampled) compresses like a photo.
        small = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((int(w), int(h)), Image.BILINEAR)
        noise = rng.integers(-20, 21, size=(h, w, 3))
        pixels = np.clip(np.asarray(image).astype(int) + noise, 0, 255).astype(np.uint8)
        folder_c = os.path.join(folder, "train", f"class{i % num_classes:02d}")
        os.makedirs(folder_c, exist_ok=True)
        Image.fromarray(pixels).save(os.path.join(folder_c, f"{i:05d}.jpg"), quality=90)


PROG = "python -m dvp_jax.input.throughput"
FLAGS = flags.FlagValues()
flags.DEFINE_string("source", "folder:/tmp/dvp_jpegs", "input.source to read", flag_values=FLAGS)
flags.DEFINE_string("split", "train", "the split to read", flag_values=FLAGS)
flags.DEFINE_string("transform", "moco_v2", "the train transform to time", flag_values=FLAGS)
flags.DEFINE_integer("image_size", 224, "output image side (pixels)", flag_values=FLAGS)
flags.DEFINE_integer("global_batch", 64, "examples per batch", flag_values=FLAGS)
flags.DEFINE_integer("num_batches", 8, "timed batches per run", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 3, "timed runs; the median is printed", flag_values=FLAGS)
flags.DEFINE_string("make_jpegs", "", "First write 500 random JPEGs here", flag_values=FLAGS)
flags.DEFINE_integer("antialias", 1, "input.resize_antialias (1 on, 0 off)", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse(FLAGS, argv, prog=PROG, doc=__doc__)
    if args.make_jpegs and not os.path.isdir(os.path.join(args.make_jpegs, "train")):
        make_jpegs(args.make_jpegs)
    from dvp_jax import config_base
    config = config_base.input_config(args.source, args.image_size)
    config.resize_antialias = bool(args.antialias)
    runs = [measure(config, args.split, args.transform, args.global_batch, args.image_size,
                    args.num_batches) for _ in range(args.repeats)]
    rates = [r["images_per_s"] for r in runs]
    cpu_rates = [r["images_per_cpu_s"] for r in runs]
    print(f"{args.transform} {args.image_size}px from {args.source}, batch {args.global_batch} x "
          f"{args.num_batches}: median {statistics.median(rates):.1f} images/s "
          f"(runs: {', '.join(f'{r:.1f}' for r in rates)}; {os.cpu_count()} CPUs), "
          f"median {statistics.median(cpu_rates):.1f} images per CPU-second")


if __name__ == "__main__":
    sys.exit(cli.run(main))
