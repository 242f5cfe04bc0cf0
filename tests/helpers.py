"""Assertions shared by several test modules (import as ``from helpers import ...``; tests/ is
on sys.path under pytest's default rootdir-relative import mode)."""
import numpy as np


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
