"""configs/ refactors change no preset: every preset of every config file equals its snapshot
(tests/data/config_snapshots.json, written by tests/make_config_snapshots.py), and a config
file loaded by path, as ``--config=configs/FILE.py`` loads it, from another working directory,
gives the same config as the package import."""
import json
import os
import subprocess
import sys

from helpers import REPO  # noqa: E402
from make_config_snapshots import PATH, snapshots  # noqa: E402


def test_every_preset_equals_its_snapshot():
    with open(PATH, encoding="utf-8") as f:
        saved = json.load(f)
    now = snapshots()
    assert sorted(now) == sorted(saved)
    changed = [name for name in saved if now[name] != saved[name]]
    assert not changed, f"presets changed (rerun tests/make_config_snapshots.py if meant): {changed}"


def test_a_config_file_loads_by_path_from_another_directory(tmp_path):
    code = ("import json, sys\n"
            "from ml_collections import config_flags\n"
            "from absl import flags\n"
            "config_flags.DEFINE_config_file('config', None, 'c')\n"
            "flags.FLAGS(['x', '--config=' + sys.argv[1]])\n"
            "print(flags.FLAGS.config.to_json_best_effort())\n")
    path = os.path.join(REPO, "configs", "table1.py") + ":runlocal"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # As a user's shell: the repository is not on sys.path.
    out = subprocess.run([sys.executable, "-c", code, path], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(PATH, encoding="utf-8") as f:
        assert json.loads(out.stdout.strip().splitlines()[-1]) == json.load(f)["table1.py:runlocal"]
