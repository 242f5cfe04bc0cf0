"""Input benchmarks of ``python -m dvp_jax.benchmark``: 'input' (the tf.data pipeline alone,
host vs device augmentation) and 'train' (a train step fed by the real pipeline, end to end).

Both read a folder of random JPEGs written for the run (``benchmark_jpegs``: a fresh temporary
folder, or a new / empty --jpeg_dir), never a user's data. Rates are images per second,
medians over --repeats timed runs.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from typing import Callable

import jax
import ml_collections
import numpy as np

from dvp_jax import config_base, errors, loop, sharding


@contextlib.contextmanager
def benchmark_jpegs(keep_dir: str, num_images: int):
    """Yields a folder of ``num_images`` fresh random JPEGs (folder-source layout).

    Without ``keep_dir``: a new temporary folder, removed afterwards. With it: ``keep_dir``
    must not exist yet or be empty (never a user's data set: nothing is ever overwritten) and
    is kept.
    """
    from dvp_jax.input import throughput
    if keep_dir:
        if os.path.exists(keep_dir) and (not os.path.isdir(keep_dir) or os.listdir(keep_dir)):
            raise errors.UserError(
                f"--jpeg_dir {keep_dir} exists and is not empty; the benchmark writes its own "
                f"random JPEGs there and never into existing data. Give a new folder, or omit "
                f"--jpeg_dir to use a temporary one.")
        os.makedirs(keep_dir, exist_ok=True)
        throughput.make_jpegs(keep_dir, num_images=num_images)
        yield keep_dir
        return
    with tempfile.TemporaryDirectory(prefix="dvp_jpegs_") as folder:
        throughput.make_jpegs(folder, num_images=num_images)
        yield folder


def bench_input(args) -> list[dict]:
    """The tf.data pipeline's img/s on host CPUs in both input.augment_on modes (two-view
    MoCo augmentation by default); see ``input_mode_records``."""
    with benchmark_jpegs(args.jpeg_dir, args.num_jpegs) as folder:
        return input_mode_records(args, _jpeg_input_config(args, folder))


def _jpeg_input_config(args, folder: str) -> ml_collections.ConfigDict:
    """An input config reading the benchmark's folder of JPEGs at --res."""
    return config_base.input_config(source=f"folder:{folder}", image_size=args.res)


def input_mode_records(args, config) -> list[dict]:
    """One record per input.augment_on mode: 'images_per_s' = examples per second the host
    delivers of what that mode needs from it ('host': the finished float32 views; 'device':
    the decoded uint8 squares), median of --repeats runs, the modes interleaved so that both
    see the same machine load. The 'device' record adds 'device_augment_ms_per_batch': the
    jitted augmentation of one global batch on this process's devices (median)."""
    from dvp_jax.input import throughput
    rates = {mode: [] for mode in ("host", "device")}
    for _ in range(args.repeats):
        for mode in rates:
            mode_config = ml_collections.ConfigDict(config.to_dict())
            mode_config.augment_on = mode
            rates[mode].append(throughput.measure(mode_config, "train", args.transform,
                                                  args.batch, args.res,
                                                  args.input_batches)["images_per_s"])
    records = []
    for mode, runs in rates.items():
        records.append({"kind": "input", "mode": mode, "transform": args.transform,
                        "res": args.res, "batch": args.batch,
                        "images_per_s": statistics.median(runs), "images_per_s_runs": runs,
                        "source": "folder of JPEGs", "host_cpus": _cpu_count()})
    device = records[1]
    device["speedup_over_host"] = device["images_per_s"] / records[0]["images_per_s"]
    device["device_augment_ms_per_batch"] = device_augment_ms(args, config)
    device["device_kind"] = jax.devices()[0].device_kind
    device["device_count"] = jax.local_device_count()
    return records


def device_augment_ms(args, config) -> float:
    """Median milliseconds of the jitted device augmentation of one uint8 batch (--batch
    examples of the stored size) on this process's devices."""
    from dvp_jax.input import device_augment, eval_crops
    mesh = sharding.make_mesh(jax.local_devices())
    fn = jax.jit(device_augment.sharded_augment(
        mesh, transform=args.transform, input_config=config, image_size=args.res, seed=0))
    size = eval_crops.resize_size(args.res, config)
    rng = np.random.default_rng(0)
    batch = sharding.to_global({
        "image": rng.integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8),
        "epoch": np.zeros(args.batch, np.int32),
        "index": np.arange(args.batch, dtype=np.int32)}, mesh)
    jax.block_until_ready(fn(batch))  # Compile and warm up.
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(batch))
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


# Train-step kind -> the transform its batches use ('train' kind, --step).
TRAIN_TRANSFORMS = {"moco": "moco_v2", "supervised": "train_crop_flip"}


def bench_train(args, mesh, counter, step_parts: Callable) -> dict:
    """See ``_bench_train``; the JPEG folder lives for the whole run. ``step_parts(args, mesh)``
    -> (init_state, train_step, batch) of the --step kind (benchmark.STEP_KINDS);
    ``counter.count``: compilations so far (benchmark.CompileCounter)."""
    with benchmark_jpegs(args.jpeg_dir, args.num_jpegs) as folder:
        return _bench_train(args, mesh, counter, folder, step_parts)


def _bench_train(args, mesh, counter, folder: str, step_parts: Callable) -> dict:
    """End to end: the --step kind's train step fed by the real input pipeline (folder of
    JPEGs) in mode --input, img/s over --repeats runs of --steps steps after a warm-up; and
    the same step alone on one fixed device batch ('step_only_images_per_s'). The input is
    the bottleneck where images_per_s is clearly below step_only_images_per_s."""
    from dvp_jax.input import device_augment, pipeline
    init_state, train_step, _ = step_parts(args, mesh)
    transform = TRAIN_TRANSFORMS[args.step]
    config = ml_collections.ConfigDict({"input": _jpeg_input_config(args, folder), "seed": 0})
    config.input.augment_on = args.input
    rep = sharding.replicated(mesh)
    step = jax.jit(device_augment.wrap_step(train_step, config, mesh, transform),
                   donate_argnums=0, in_shardings=(rep, sharding.batch_sharded(mesh)),
                   out_shardings=(rep, rep))
    host_batches = pipeline.make_train_iterator(
        config.input, "train", transform, global_batch=args.batch, seed=0, image_size=args.res)
    keep = (device_augment.DEVICE_INPUT_KEYS + ("label",) if args.input == "device"
            else ("view1", "view2") if transform == "moco_v2" else ("image", "label"))
    batches = loop.prefetch_to_mesh(({k: b[k] for k in keep} for b in host_batches), mesh,
                                    size=2)
    state = loop.init_on_mesh(init_state, mesh, seed=0)
    t0 = time.perf_counter()
    first = next(batches)
    state, metrics = step(state, first)  # Compile + warm-up.
    jax.block_until_ready(metrics)
    warmup_s = time.perf_counter() - t0
    compiles_before = counter.count

    def timed(next_batch) -> list[float]:
        nonlocal state, metrics
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = step(state, next_batch())
            jax.block_until_ready(metrics)
            times.append((time.perf_counter() - t0) / args.steps)
        return times

    end_to_end = timed(lambda: next(batches))
    step_only = timed(lambda: first)
    if counter.count != compiles_before:
        raise RuntimeError(f"train: the step recompiled {counter.count - compiles_before} times.")
    median, step_median = statistics.median(end_to_end), statistics.median(step_only)
    return {
        "kind": "train", "step": args.step, "input": args.input, "transform": transform,
        "model": args.model, "res": args.res, "batch": args.batch, "dtype": args.dtype,
        "images_per_s": args.batch / median, "step_times_s": end_to_end,
        "step_only_images_per_s": args.batch / step_median, "step_only_times_s": step_only,
        "input_bound": median > 1.1 * step_median, "warmup_s": warmup_s,
        "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
        "host_cpus": _cpu_count(), "loss": float(metrics["loss"]),
    }


def _cpu_count() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
