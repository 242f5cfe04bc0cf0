r"""The command line: one config, one workdir.

    python -m dvp_jax.main --config=configs/FILE.py[:PRESET] --workdir=DIR [--config.a.b=value ...]

Multi-host: ``jax.distributed.initialize`` runs first (see dvp_jax/distributed.py); on one
host it does nothing. Mistakes a user can fix (a bad config key or value, missing data, a
foreign workdir, a NaN) end with one ``error:`` line and exit code 2, not a traceback.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dvp_jax import distributed, errors, loop, preemption, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/FILE.py[:PRESET]", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])
distributed.define_flags()


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_flags(argv):
    """absl flag parsing with config override mistakes reported in one line."""
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
    rerun, a resume or the next seed of the pipeline loads them instead of recompiling."""
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
    distributed.initialize()
    with preemption.installed():
        try:
            enable_compilation_cache()
            logging.info("Config:\n%s", FLAGS.config)
            train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
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


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
