"""Split names and per-process shards: the grammar and arithmetic every source shares.

Split names: 'train', 'val', 'test' (per source), '+'-unions such as 'train+val' (indices run
through the parts in order) and TFDS-style slices such as 'train[:10%]' or 'val[10:20]'.

Shards: process ``p`` of ``P`` gets a contiguous block of the split; the blocks are disjoint,
cover the split exactly and differ in size by at most one example.

Pure Python (no TensorFlow).
"""
from __future__ import annotations

import re

from dvp_jax.errors import DataError

_PART_RE = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*(?:\[\s*([-+]?\d*%?)\s*:\s*([-+]?\d*%?)\s*\])?\s*$")


def parse_split(split: str) -> list[tuple[str, str | None, str | None]]:
    """'train+val[:10%]' -> [('train', None, None), ('val', None, '10%')]."""
    parts = []
    for part in split.split("+"):
        m = _PART_RE.match(part)
        if not m:
            raise DataError(f"Cannot parse split {split!r}: expected names such as 'train', "
                            f"'train+val' or 'train[:10%]', got the part {part!r}.")
        name, lo, hi = m.groups()
        parts.append((name, lo or None, hi or None))
    return parts


def _bound(spec: str | None, n: int, default: int) -> int:
    """A slice bound: absolute ('10', '-5') or percent ('10%', rounded to the closest example)."""
    if spec is None:
        return default
    if spec.endswith("%"):
        value = int(round(float(spec[:-1]) * n / 100.0))
    else:
        value = int(spec)
    if value < 0:
        value += n
    return min(max(value, 0), n)


def slice_bounds(n: int, lo: str | None, hi: str | None) -> tuple[int, int]:
    """[start, stop) of a slice spec within a split of ``n`` examples."""
    start, stop = _bound(lo, n, 0), _bound(hi, n, n)
    return start, max(start, stop)


def shard_bounds(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, stop) of process ``process_index``'s contiguous block of ``num_examples``."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
    return (num_examples * process_index // process_count,
            num_examples * (process_index + 1) // process_count)

