"""Forward (inference) throughput of a registered model on the default JAX backend.

    python -m dvp_jax.models.throughput [NAME [RES [BATCH [DTYPE]]]]

prints one JSON line (defaults: resnet50 224 32 float32); from Python:

    python -c "from dvp_jax.models.throughput import forward_images_per_s as f; \
               print(f('resnet50', 224, 32))"
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import flags

from dvp_jax import cli, models


def forward_images_per_s(name: str, res: int, batch: int, dtype: str = "float32",
                         repeats: int = 5, *, num_classes: int = 1000,
                         warmup: int = 2) -> dict:
    """Images/s of a jitted inference forward pass (BN in inference mode, 'logits' and
    'pooled' computed) of ``models.build(name, num_classes=num_classes, dtype=dtype)``.

    Random-init weights, a random input [batch, res, res, 3] resident on the device. After
    ``warmup`` untimed calls (the first one compiles), times ``repeats`` calls, each until
    the result is ready.

    Returns: {'name', 'res', 'batch', 'dtype', 'device', 'images_per_s' (from the median
    time), 'median_s' (seconds per batch), 'times_s' (each repeat), 'compile_s' (first call)}.
    """
    model = models.build(name, num_classes=num_classes, dtype=dtype)
    x = jax.random.normal(jax.random.key(1), (batch, res, res, 3), jnp.float32)
    variables = jax.jit(lambda k: model.init(k, x[:1], train=False))(jax.random.key(0))

    @jax.jit
    def forward(v, x):
        out = model.apply(v, x, False)
        return out["logits"], out["pooled"]

    t0 = time.perf_counter()
    jax.block_until_ready(forward(variables, x))
    compile_s = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        jax.block_until_ready(forward(variables, x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(forward(variables, x))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"name": name, "res": res, "batch": batch, "dtype": str(jnp.dtype(dtype)),
            "device": str(jax.devices()[0].device_kind), "images_per_s": batch / med,
            "median_s": med, "times_s": times, "compile_s": compile_s}


PROG = "python -m dvp_jax.models.throughput"
FLAGS = flags.FlagValues()  # Positional arguments only.


def main(argv: list[str] | None = None) -> int:
    """Prints the JSON line of ``forward_images_per_s(NAME, RES, BATCH, DTYPE)``."""
    args = cli.parse(FLAGS, argv, prog=PROG, doc=__doc__, positional="[NAME [RES [BATCH [DTYPE]]]]",
                     max_positional=4)
    given = args.positional
    try:
        res, batch = (int(given[i]) if len(given) > i else default
                      for i, default in ((1, 224), (2, 32)))
    except ValueError as e:
        cli.fail(f"RES and BATCH must be integers: {e}")
    print(json.dumps(forward_images_per_s(given[0] if given else "resnet50", res, batch,
                                          given[3] if len(given) > 3 else "float32")))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
