r"""Throughput and memory of the train steps (and of the input pipeline).

    python -m dvp_jax.benchmark moco supervised distill --model resnet18 --res 64 --batch 64
    python -m dvp_jax.benchmark moco supervised --model resnet50 --res 224 --batch 256 --dtype bf16
    python -m dvp_jax.benchmark input --res 224 --batch 64
    python -m dvp_jax.benchmark train --model resnet50 --res 224 --batch 256 --dtype bf16 --input device

Each kind prints one JSON line: img/s (median over ``--repeats`` timed runs of ``--steps``
steps each), step time, compile time, parameter count, FLOPs per image (XLA's cost analysis
of the compiled step) and the fraction of the device's peak they reach, peak device and host
memory, device kind and count. When both moco and supervised run, a last line gives the
MoCo / supervised img/s ratio (ideal 3/4: the key encoder adds one forward to a forward +
backward). Batches are synthetic and device-resident, so the train-step kinds import no
TensorFlow; the steps are the trainers' own step functions, jitted with the state donated
and the batch sharded over every device, exactly as in training.

'input' prints one line per input.augment_on mode ('host': tf.data makes the float32 views;
'device': the host only decodes to uint8, the views are made on the devices): host img/s of
each, and the device mode's 'device_augment_ms_per_batch'. 'train' feeds the --step kind's
step from the real pipeline (JPEG folder) in mode --input: end-to-end img/s next to the step
alone ('input_bound': true where the input slows the step by over 10%).
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from dvp_jax import (benchmark_input, cli, config_base, console, jsonfmt, loop, pretrained,
                     sharding)
from dvp_jax.models.spec import ModelSpec

# Dense peak FLOP/s of one device by device_kind (bf16 tensor cores for GPUs/TPUs).
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12,
}


def measured_cpu_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a float32 [n, n] @ [n, n] matmul on this CPU: the practical peak."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times)


def device_peak_flops() -> tuple[float | None, str]:
    """(peak FLOP/s of all devices together, where the number comes from)."""
    kind = jax.devices()[0].device_kind
    n = jax.device_count()
    if jax.devices()[0].platform == "cpu":
        return measured_cpu_peak_flops(), "measured fp32 matmul (all CPU devices share the cores)"
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops * n, f"datasheet dense bf16 for {name}"
    return None, f"unknown device kind {kind!r}"


def _model_config(args) -> ml_collections.ConfigDict:
    c = config_base.model_config(args.model)
    c.small_stem = args.small_stem
    c.width_multiplier = args.width
    c.dtype = "bfloat16" if args.dtype in ("bf16", "bfloat16") else "float32"
    return c


def _synthetic_images(mesh, key, batch, res):
    s = sharding.batch_sharded(mesh)
    return jax.jit(lambda k: jax.random.normal(k, (batch, res, res, 3), jnp.float32),
                   out_shardings=s)(key)


def _synthetic_labels(mesh, key, batch, classes):
    s = sharding.batch_sharded(mesh)
    return jax.jit(lambda k: jax.random.randint(k, (batch,), 0, classes, jnp.int32),
                   out_shardings=s)(key)


def _moco(args, mesh):
    from dvp_jax import optim
    from dvp_jax.trainers import moco
    config = config_base.base_config("moco")
    config.moco = config_base.moco_config()
    config.optim = config_base.optim_config(base_lr=0.03)
    config.model = _model_config(args)
    config.input.image_size = args.res
    config.batch_size = args.batch
    config.moco.queue_size = max(args.batch, 4096 // args.batch * args.batch)
    groups = moco.bn_groups(config, mesh)
    model = ModelSpec.from_config(config.model, projection_dims=moco.projection_dims(config),
                                  bn_groups=groups).build()
    tx = optim.make_optimizer(config.optim, optim.make_schedule(
        config.optim, global_batch=args.batch, steps_per_epoch=100, num_epochs=1))
    step = moco.make_train_step(model, tx, config.moco, total_steps=100, shuffle=True)
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    batch = {"view1": _synthetic_images(mesh, k1, args.batch, args.res),
             "view2": _synthetic_images(mesh, k2, args.batch, args.res)}
    return moco.make_init_state(model, tx, config, groups), step, batch


def _classify_parts(args, mesh, *, distill: bool):
    """Phase 2's step (L2 distillation from a frozen teacher) or the plain supervised step."""
    from dvp_jax import optim
    from dvp_jax.trainers import classify, common
    from dvp_jax.trainers import distill as distill_lib
    config = config_base.base_config("supervised")
    config.input.image_size = args.res
    config.model = _model_config(args)
    config.optim = config_base.optim_config(base_lr=0.1)
    config.optim.nesterov = True
    model = ModelSpec.from_config(config.model, num_classes=1000).build()
    tx = optim.make_optimizer(config.optim, optim.make_schedule(
        config.optim, global_batch=args.batch, steps_per_epoch=100, num_epochs=1))
    extra = None
    if distill:  # The teacher is a frozen copy of the student's initial backbone.
        teacher_spec = ModelSpec.from_config(config.model)
        teacher_model = teacher_spec.build()
        shapes = jax.eval_shape(lambda r: teacher_model.init(
            r, common.dummy_images(config), train=False), jax.random.PRNGKey(0))
        teacher = pretrained.Pretrained(teacher_spec, shapes, {}, "(benchmark)", 0)
        dc = ml_collections.ConfigDict({"kind": "l2", "weight": 1e-4, "teacher_bn": "eval"})
        extra = distill_lib.make_distill_term(teacher_model, dc, start_step=0, teacher=teacher,
                                              student_from_teacher=True)
    step = classify.make_train_step(model, tx, extra=extra)
    init = classify.make_init_state(model, tx, config, extra=extra)
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    batch = {"image": _synthetic_images(mesh, k1, args.batch, args.res),
             "label": _synthetic_labels(mesh, k2, args.batch, 1000)}
    return init, step, batch


# kind -> (args, mesh) -> (init_state(rng), train_step, device-resident batch).
STEP_KINDS: dict[str, Callable] = {
    "moco": _moco,
    "supervised": lambda args, mesh: _classify_parts(args, mesh, distill=False),
    "distill": lambda args, mesh: _classify_parts(args, mesh, distill=True),
}


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def peak_device_memory() -> int | None:
    """Largest peak_bytes_in_use over the local devices (None where not reported, e.g. CPU)."""
    peaks = []
    for d in jax.local_devices():
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) if peaks else None


class CompileCounter:
    """Counts XLA backend compilations while installed (to assert there are none in the loop)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if event == self.EVENT:
            self.count += 1


def bench_step(kind: str, args, mesh, counter: CompileCounter) -> dict:
    """Compiles and times one train-step kind; returns the JSON record."""
    init_state, train_step, batch = STEP_KINDS[kind](args, mesh)
    rep = sharding.replicated(mesh)
    state = loop.init_on_mesh(init_state, mesh, seed=0)
    step = jax.jit(train_step, donate_argnums=0, in_shardings=(rep, sharding.batch_sharded(mesh)),
                   out_shardings=(rep, rep))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops_per_step = float(cost.get("flops", 0.0)) if cost else 0.0
    state, metrics = step(state, batch)  # Warm-up (first execution, allocations).
    jax.block_until_ready(metrics)
    compiles_before = counter.count
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)  # One host sync per timed run.
        times.append((time.perf_counter() - t0) / args.steps)
    recompiles = counter.count - compiles_before
    if recompiles:
        raise RuntimeError(f"{kind}: the train step recompiled {recompiles} times after step 1.")
    median = statistics.median(times)
    peak, peak_source = device_peak_flops()
    flops_per_s = flops_per_step / median
    return {
        "kind": kind, "model": args.model, "res": args.res, "batch": args.batch,
        "dtype": args.dtype, "images_per_s": args.batch / median, "step_time_s": median,
        "step_times_s": times, "compile_s": compile_s,
        "params": count_params(state["params"]),
        "gflops_per_image": flops_per_step / args.batch / 1e9,
        "achieved_tflops": flops_per_s / 1e12,
        "fraction_of_peak": (flops_per_s / peak) if peak else None, "peak_source": peak_source,
        "peak_device_memory_bytes": peak_device_memory(),
        "peak_host_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "recompiles_after_first_step": recompiles,
        "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
        "loss": float(metrics["loss"]),
    }


PROG = "python -m dvp_jax.benchmark"
KINDS = sorted(STEP_KINDS) + ["input", "train"]
FLAGS = flags.FlagValues()
flags.DEFINE_string("model", "resnet18", "The backbone.", flag_values=FLAGS)
flags.DEFINE_integer("res", 64, "Image side (pixels).", flag_values=FLAGS)
flags.DEFINE_integer("batch", 64, "Global batch.", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "fp32", ["fp32", "bf16", "float32", "bfloat16"], "Compute dtype.",
                  flag_values=FLAGS)
flags.DEFINE_integer("steps", 5, "Steps per timed run.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 3, "Timed runs; the median is reported.", flag_values=FLAGS)
flags.DEFINE_boolean("small_stem", False, "3x3 stride-1 stem without max-pool (small images).",
                     flag_values=FLAGS)
flags.DEFINE_float("width", 1.0, "Backbone width multiplier.", flag_values=FLAGS)
flags.DEFINE_string("transform", "moco_v2", "input: the transform to time.", flag_values=FLAGS)
flags.DEFINE_string("jpeg_dir", "", "input: a NEW (or empty) folder to write the random benchmark "
                    "JPEGs to and keep (default: a temporary folder, removed afterwards).",
                    flag_values=FLAGS)
flags.DEFINE_integer("num_jpegs", 300, "input: random JPEGs to write.", flag_values=FLAGS)
flags.DEFINE_integer("input_batches", 5, "input: batches per timed run.", flag_values=FLAGS)
flags.DEFINE_enum("input", "device", ["device", "host"],
                  "train: input.augment_on of the end-to-end run.", flag_values=FLAGS)
flags.DEFINE_enum("step", "moco", sorted(benchmark_input.TRAIN_TRANSFORMS),
                  "train: the train step fed by the input pipeline.", flag_values=FLAGS)
cli.define_verbosity(FLAGS)


def parse_args(argv=None):
    """The flags' values and ``kinds``: the positional arguments, each one of KINDS (argv
    without the program name; None: sys.argv[1:])."""
    args = cli.parse(FLAGS, argv, prog=PROG, doc=__doc__, positional="KIND [KIND ...]",
                     min_positional=1, max_positional=None)
    args.kinds = args.positional
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown:
        cli.fail(f"unknown kind(s) {unknown}: choose from {KINDS}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    console.setup(args.verbosity)
    if "input" in args.kinds:
        console.import_tensorflow_quietly()
    console.say(f"benchmark {' '.join(args.kinds)} on {console.devices_line()}")
    mesh = sharding.make_mesh()
    sharding.check_global_batch(args.batch, mesh, key="--batch")
    counter = CompileCounter()
    records = []
    for kind in args.kinds:
        if kind == "input":
            new = benchmark_input.bench_input(args)
        elif kind == "train":
            new = [benchmark_input.bench_train(args, mesh, counter, STEP_KINDS[args.step])]
        else:
            new = [bench_step(kind, args, mesh, counter)]
        for record in new:
            print(jsonfmt.dumps(record), flush=True)
        records.extend(new)
    rates = {r["kind"]: r["images_per_s"] for r in records}
    if "moco" in rates and "supervised" in rates:
        print(jsonfmt.dumps({"kind": "ratio", "moco_over_supervised": rates["moco"] / rates["supervised"],
                          "ideal": 0.75}), flush=True)
    return records


if __name__ == "__main__":
    sys.exit(cli.run(main))
