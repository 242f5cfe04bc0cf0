"""JSON for measured numbers: every float rounded to 6 significant digits.

Metrics leave the devices as float32 (about 7 significant digits); printed as float64 they
carry noise such as ``85.00000238418579``. Six significant digits keep everything float32
resolves and print ``85.0``; small values keep their exponent (``3.4375e-05``). Integers,
strings, booleans and non-finite floats pass unchanged. Configs are not rounded (a resumed
run compares them key by key).

Every writer of results (metrics.jsonl, done.json, results.json, eval_*.json, benchmark
lines) uses ``dumps``.
"""
from __future__ import annotations

import json
import math
from typing import Any

SIGNIFICANT_DIGITS = 6


def round_float(x: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """``x`` to ``digits`` significant digits (85.00000238418579 -> 85.0)."""
    if not math.isfinite(x) or x == 0:
        return x
    return float(f"{x:.{digits}g}")


def rounded(obj: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, numpy scalars and arrays) with floats rounded."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return round_float(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    if hasattr(obj, "tolist"):  # numpy / jax scalars and arrays.
        return rounded(obj.tolist(), digits)
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """``json.dumps`` of ``rounded(obj)``."""
    return json.dumps(rounded(obj), **kwargs)


def dump(obj: Any, f, **kwargs) -> None:
    """``json.dump`` of ``rounded(obj)`` into the open file ``f``."""
    json.dump(rounded(obj), f, **kwargs)
