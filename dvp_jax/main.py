r"""The command line: one config, one workdir.

    python -m dvp_jax.main --config=configs/FILE.py[:PRESET] --workdir=DIR [--config.a.b=value ...]

Multi-host: ``jax.distributed.initialize`` runs first (see dvp_jax/distributed.py); on one
host it does nothing. Mistakes a user can fix (a bad config key or value, missing data, a
foreign workdir, a NaN) end with one ``error:`` line and exit code 2, not a traceback.

The console shows a header, one progress display per stage, the evaluation results and the
final table; library logs (Orbax, TensorFlow, absl) only with --verbosity (-1 warnings,
0 info, 1 debug). Everything, with the full config, goes to WORKDIR/log.txt
(dvp_jax/console.py). --help prints this usage and exits 0.
"""
import importlib
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from dvp_jax import (config_checks, console, distributed, errors, loop, preemption, registry,
                     train)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/FILE.py[:PRESET]", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])
distributed.define_flags()


def _fail(message: str) -> None:
    console.file_only(f"error: {message}")
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_flags(argv):
    """absl flag parsing with config override mistakes reported in one line."""
    console.exit_on_help(argv)
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _fail(f"{e}\nPass --helpfull to see the flags.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections raises these for an unknown key or a value of the wrong type.
        detail = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        _fail(f"bad --config override: {detail}. Every overridden key must exist in the config "
              f"file (see its docstring) and keep its type.")


def enable_compilation_cache() -> None:
    """Compiled programs persist in ~/.cache/dvp_jax/xla (or $JAX_COMPILATION_CACHE_DIR): a
    rerun, a resume or the next seed of Table 1 loads them instead of recompiling."""
    import jax
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir",
                          os.path.join(os.path.expanduser("~"), ".cache", "dvp_jax", "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    # jax.distributed.initialize installs its own SIGTERM handler (its preemption notifier):
    # ours go in after it. SIGTERM / SIGINT: a checkpoint if training, then exit
    # preemption.EXIT_CODE, wherever they arrive (training, evaluation, between stages).
    console.setup(FLAGS.verbosity if FLAGS["verbosity"].present else None)
    try:
        distributed.initialize()
    except errors.USER_ERRORS as e:
        _fail(f"{type(e).__name__}: {e}")
    with preemption.installed():
        try:
            enable_compilation_cache()
            _start_console()  # Initialises the JAX backends.
            # Training reads data with tf.data. Imported after the JAX backends exist, as before
            # (TF loaded first made the 2-process gloo collectives abort in test_multihost.py).
            console.import_tensorflow_quietly()
            run(FLAGS.config, FLAGS.workdir)
        except preemption.Preempted as e:
            print(f"preempted: {e}", file=sys.stderr, flush=True)
            raise
        except errors.USER_ERRORS as e:
            _fail(f"{type(e).__name__}: {e}")
        except (OSError, ValueError) as e:
            code = loop.disk_errno(e)
            if code is None:
                raise
            _fail(f"cannot write to {FLAGS.workdir}: {os.strerror(code)} ({str(e)[:300]}). Free "
                  f"space or fix the permissions, then rerun the same command: it resumes from "
                  f"the last checkpoint.")


def _experiment(config):
    """The experiment module named by ``config.experiment`` (registry.EXPERIMENTS), or None for
    a trainer config."""
    name = config.get("experiment")
    if not name:
        return None
    if name not in registry.EXPERIMENTS:
        config_checks.validate(config)  # Raises the one-line error naming the allowed names.
    return importlib.import_module(registry.EXPERIMENTS[name])


def run(config, workdir: str):
    """An experiment config runs its experiment; a trainer config ``train_and_evaluate``."""
    experiment = _experiment(config)
    if experiment is not None:
        return experiment.run(config, workdir)
    return train.train_and_evaluate(config, workdir)


def describe(config) -> str:
    experiment = _experiment(config)
    return experiment.describe(config) if experiment else train.describe(config)


def _start_console() -> None:
    """The run's header and WORKDIR/log.txt with the full config (process 0 only: the other
    processes print only warnings and errors)."""
    import jax
    if jax.process_index() != 0:
        return
    console.log_to_file(os.path.join(FLAGS.workdir, "log.txt"),
                        title=" ".join(["python -m dvp_jax.main"] + list(sys.argv[1:])))
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    console.header([
        f"dvp_jax: {describe(FLAGS.config)}",
        f"config:    {config_flags.get_config_filename(FLAGS['config'])}" +
        (f" with {' '.join(overrides)}" if overrides else ""),
        f"workdir:   {os.path.abspath(FLAGS.workdir)} (log.txt: everything, with the config)",
        f"devices:   {console.devices_line()}",
    ])
    console.file_only(f"Config:\n{FLAGS.config}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
