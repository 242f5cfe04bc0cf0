"""configs/common.py: preset dispatch, stage lengths and the shared classification section."""
import importlib
import os
import re

import ml_collections
import pytest

from configs import common
from helpers import REPO  # noqa: E402

CONFIG_FILES = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
                      if f.endswith(".py") and not f.startswith("_") and f != "common.py")


def _config(tag):
    c = ml_collections.ConfigDict()
    c.tag = tag
    return c


def test_get_preset_default_named_and_unknown():
    presets = {"small": lambda: _config("s"), "big": lambda: _config("b")}
    assert common.get_preset(presets, "", default="big", filename="x.py").tag == "b"
    assert common.get_preset(presets, "small", default="big", filename="x.py").tag == "s"
    with pytest.raises(ValueError, match=re.escape(
            "Unknown preset 'huge' for configs/x.py; allowed: small, big.")):
        common.get_preset(presets, "huge", default="big", filename="x.py")
    # Each call builds a fresh config: changing one preset's result leaves the next call alone.
    common.get_preset(presets, "small", default="big", filename="x.py").tag = "changed"
    assert common.get_preset(presets, "small", default="big", filename="x.py").tag == "s"


def test_set_epochs_moves_step_decays_with_the_length():
    stage = ml_collections.ConfigDict({"num_epochs": 30.0, "optim": {
        "schedule": "step", "decay_epochs": (9.0, 18.0, 27.0)}})
    common.set_epochs(stage, 20.0)
    assert stage.num_epochs == 20.0
    assert stage.optim.decay_epochs == pytest.approx((6.0, 12.0, 18.0))
    cosine = ml_collections.ConfigDict({"num_epochs": 40.0, "optim": {"schedule": "cosine"}})
    common.set_epochs(cosine, 120.0)
    assert cosine.num_epochs == 120.0 and "decay_epochs" not in cosine.optim
    no_optim = ml_collections.ConfigDict({"num_epochs": 5.0})
    common.set_epochs(no_optim, 1.0)
    assert no_optim.num_epochs == 1.0


def test_classify_section_defaults_are_off():
    c = common.classify_section()
    assert dict(c) == {"label_smoothing": 0.0, "mixup_alpha": 0.0}


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_dispatches_through_its_presets_table(name):
    module = importlib.import_module(f"configs.{name}")
    with pytest.raises(ValueError) as e:
        module.get_config("__no_such_preset__")
    allowed = re.search(r"allowed: (.*?)\.?$", str(e.value)).group(1).split(", ")
    assert allowed == list(module.PRESETS)
    assert module.get_config("").to_dict() == module.get_config().to_dict()
