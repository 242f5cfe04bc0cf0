"""Writes tests/data/config_snapshots.json: every preset of every configs/*.py as JSON.

    python tests/make_config_snapshots.py

Run it only when a preset is meant to change (then review the diff of the JSON file):
tests/test_config_snapshots.py checks that refactoring configs/ changes no preset.
"""
import importlib
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(REPO, "tests", "data", "config_snapshots.json")


def preset_names(module) -> list[str]:
    """The presets a config file allows (its error for an unknown preset lists them)."""
    try:
        module.get_config("__no_such_preset__")
    except ValueError as e:
        found = re.search(r"allowed: (.*?)\.?$", str(e))
        return [p.strip() for p in found.group(1).split(",")]
    raise AssertionError(f"{module.__name__} accepted an unknown preset")


def snapshots() -> dict:
    """{'FILE.py:PRESET': the config as JSON-able dicts} of every config file and preset."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    out = {}
    for name in sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
                       if f.endswith(".py") and not f.startswith("_") and f != "common.py"):
        module = importlib.import_module(f"configs.{name}")
        for preset in preset_names(module):
            out[f"{name}.py:{preset}"] = json.loads(module.get_config(preset).to_json_best_effort())
    return out


if __name__ == "__main__":
    os.makedirs(os.path.dirname(PATH), exist_ok=True)
    with open(PATH, "w", encoding="utf-8") as f:
        json.dump(snapshots(), f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {PATH}")
