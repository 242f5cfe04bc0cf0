"""Every preset of every config file passes ``config_checks.validate``, and a wrong value for
each key that has an allowed set or a constraint is refused naming the key and the value."""
import importlib
import os
import re
import subprocess
import sys

import pytest

from dvp_jax import config_checks
from helpers import REPO  # noqa: E402

# The experiment config files (configs/common.py holds helpers, not presets).
CONFIG_FILES = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
                      if f.endswith(".py") and not f.startswith("_") and f != "common.py")
# Wrong values tried, by the type of the key's default (the first one a rule refuses is used).
CANDIDATES = {str: ["no_such_value", ""], int: [-1, 0], float: [-1.0, 2.0, 0.0],
              tuple: [(0.0, 1.0), (0.8, 0.2), (0.5, 2.0)]}


def presets(name):
    module = importlib.import_module(f"configs.{name}")
    with pytest.raises(ValueError) as e:
        module.get_config("__no_such_preset__")
    return module, [p.strip() for p in re.search(r"allowed: (.*?)\.?$", str(e.value)).group(1).split(",")]


def configs_to_check():
    """(label, config) of every preset; pipeline presets also give each stage's config."""
    from dvp_jax import table1
    for name in CONFIG_FILES:
        module, names = presets(name)
        for preset in names:
            c = module.get_config(preset)
            yield f"{name}.py:{preset}", c
            if "experiment" in c:
                for stage in table1.STAGES:
                    if stage not in c.skip_stages:
                        yield (f"{name}.py:{preset} stage {stage}",
                               table1.stage_config(c, stage, c.seeds[0], "/tmp/w"))


def _get(c, key):
    for part in key.split("."):
        if part not in c:
            return None
        c = c[part]
    return c


def _set(c, key, value):
    *path, last = key.split(".")
    for part in path:
        c = c[part]
    with c.unlocked() if hasattr(c, "unlocked") else nullcontext():
        c[last] = value


def nullcontext():
    import contextlib
    return contextlib.nullcontext()


def test_every_preset_is_valid_and_every_constrained_key_refuses_a_wrong_value():
    rules = config_checks._rules()
    checked = 0
    for label, c in configs_to_check():
        config_checks.validate(c)  # The preset itself is valid.
        for key, ok, allowed in rules:
            value = _get(c, key)
            if value is None or isinstance(value, bool):
                continue
            wrong = [v for v in CANDIDATES[type(value)] if not ok(type(value)(v))]
            assert wrong, f"{label}: no wrong value found for {key} (rule accepts all)"
            bad = c.copy_and_resolve_references()
            _set(bad, key, type(value)(wrong[0]))
            with pytest.raises(config_checks.ConfigError) as e:
                config_checks.validate(bad)
            assert f"config.{key}={type(value)(wrong[0])!r}" in str(e.value), (label, key)
            assert allowed in str(e.value)
            checked += 1
        for key in ("moco.queue_size", "seed_distill.queue_size"):
            if isinstance(_get(c, key), int) and isinstance(_get(c, "batch_size"), int):
                bad = c.copy_and_resolve_references()
                _set(bad, key, _get(c, "batch_size") + 1)
                with pytest.raises(config_checks.ConfigError, match=f"config.{key}=.* is not a "
                                   f"multiple of config.batch_size"):
                    config_checks.validate(bad)
                checked += 1
    assert checked > 100


def test_the_seed_queue_of_the_issue_is_one_error_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dvp_jax.main", "--config=configs/seed_distill.py:runlocal",
         f"--workdir={tmp_path}/w", "--config.seed_distill.queue_size=65"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "config.seed_distill.queue_size=65 is not a multiple of " \
        "config.batch_size=16" in lines[0], proc.stderr[-3000:]
