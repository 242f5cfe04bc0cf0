"""Experiment configs: each file's ``get_config(preset)`` returns an ml_collections ConfigDict.

Loaded by path from the command line (``--config=configs/FILE.py:PRESET``) and importable as a
package (``from configs import moco``); shared preset helpers live in ``configs/common.py``.
"""
