"""What several test modules share: paths, subprocess environments, fake checkpoints and tree
assertions. The one module tests import helpers from (``from helpers import ...``; tests/ is on
sys.path under pytest's default rootdir-relative import mode): no test module imports another.
"""
import math
import os
import socket

import jax
import jax.numpy as jnp
import numpy as np

from dvp_jax import checkpoints
from dvp_jax.models.spec import ModelSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_device_env() -> dict:
    """This environment with 2 simulated CPU devices instead of conftest's 4."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=2"])
    for k in ("DVP_COORDINATOR_ADDRESS", "DVP_NUM_PROCESSES", "DVP_PROCESS_ID"):
        env.pop(k, None)
    return env


# ----------------------------------------------------------------------------- trees


def leaves_with_paths(tree):
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_trees_equal(a, b):
    la, lb = leaves_with_paths(a), leaves_with_paths(b)
    assert la.keys() == lb.keys()
    for k in la:
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


# ----------------------------------------------------------------------------- fake models


def init_shapes(model, res, batch=1):
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32))


def random_variables(shapes, seed=0):
    """Fills a variables tree of ShapeDtypeStructs with He-scaled random weights and random
    BN affine parameters / running statistics (numpy, float32)."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        leaf = path[-1].key
        if leaf == "kernel":
            x = rng.normal(0.0, math.sqrt(2.0 / math.prod(s.shape[:-1])), s.shape)
        elif leaf == "scale":
            x = rng.uniform(0.5, 1.5, s.shape)
        elif leaf in ("bias", "mean"):
            x = rng.normal(0.0, 0.1, s.shape)
        elif leaf == "var":
            x = rng.uniform(0.5, 1.5, s.shape)
        else:
            raise AssertionError(path)
        return np.asarray(x, np.float32)

    return jax.tree.map_with_path(fill, shapes)


def write_checkpoint(directory, step: int, state: dict, meta: dict) -> str:
    """Saves ``state`` (numpy trees: 'step', 'params', 'batch_stats', ...) with ``meta`` as
    step ``step`` of the Orbax checkpoint folder ``directory``, the way trainers do."""
    mngr = checkpoints.manager(str(directory))
    checkpoints.save(mngr, step, state, meta)
    mngr.wait_until_finished()
    mngr.close()
    return str(directory)


PHASE1_STEP = 10


def write_model_checkpoint(directory, model_kwargs: dict, fill, *, step: int, seed: int) -> dict:
    """A fake trainer checkpoint of the ModelSpec ``model_kwargs`` (meta trainer 'moco'): every
    variable is ``fill(rng, path, shape)`` (float32 numpy) with ``rng =
    np.random.default_rng(seed)``, drawn in tree order; no model.init to run. Returns the state
    written: 'step', 'params', 'batch_stats'."""
    model = ModelSpec(**model_kwargs).build()
    shapes = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 16, 16, 3)), train=False),
                            jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, s: np.asarray(fill(rng, path, s.shape), np.float32), shapes)
    state = {"step": np.int32(step), "params": variables["params"],
             "batch_stats": variables["batch_stats"]}
    write_checkpoint(directory, step, state, {"trainer": "moco", "model": model_kwargs})
    return state


def _he_fill(rng, path, shape):
    """He-scaled kernels, BN scale near 1, running variance in [0.5, 1.5), small bias/mean."""
    last = path[-1].key
    if last == "scale":
        return 1.0 + 0.1 * rng.normal(size=shape)
    if last == "var":
        return rng.uniform(0.5, 1.5, size=shape)
    if last in ("bias", "mean"):
        return 0.1 * rng.normal(size=shape)
    fan_in = int(np.prod(shape[:-1]))
    return rng.normal(size=shape) * np.sqrt(2.0 / fan_in)


def write_phase1(directory, *, name="resnet18", width=0.125, seed=0, step=PHASE1_STEP):
    """A Phase-1 (MoCo-like) checkpoint with a projection head; random but BN-plausible values.
    Returns its variables: {'params', 'batch_stats'}."""
    kwargs = dict(name=name, small_stem=True, width_multiplier=width, dtype="float32",
                  zero_init_residual=False, projection_dims=[32, 16], bn_groups=1)
    state = write_model_checkpoint(directory, kwargs, _he_fill, step=step, seed=seed)
    return {"params": state["params"], "batch_stats": state["batch_stats"]}


# ----------------------------------------------------------------------------- assertions




def assert_moco_decision_rates(p):
    """MoCo v2 view parameters drawn for ~2,000 images (dict of arrays, one row per image):
    the rates and ranges of the released augmentation. Tolerances: 3.5 percentage points =
    3.9 sigma for p = 0.2 / 0.8 at 2,000 draws; 4.5 points = 4 sigma for p = 0.5."""
    assert abs(p["jitter"].mean() - 0.8) < 0.035
    assert abs(p["grayscale"].mean() - 0.2) < 0.035
    assert abs(p["blur"].mean() - 0.5) < 0.045
    assert abs(p["flip"].mean() - 0.5) < 0.045
    for key, lo, hi in (("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4),
                        ("saturation", 0.6, 1.4), ("hue", -0.1, 0.1), ("sigma", 0.1, 2.0)):
        assert p[key].min() >= lo and p[key].max() <= hi, key
        assert p[key].min() < lo + 0.05 * (hi - lo) and p[key].max() > hi - 0.05 * (hi - lo), key
    orders = p["jitter_order"]
    assert (np.sort(orders, axis=1) == np.arange(4)).all()  # Permutations of the 4 ops...
    assert len({tuple(o) for o in orders}) == 24  # ...all 24 of them appear.
