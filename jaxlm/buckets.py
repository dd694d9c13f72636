"""Padding token-id rows to a few fixed shapes, so jitted functions compile a bounded number of times.

Shared by the eval engine and the sentence embedder (and the data pipeline's numpy batches).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_LENGTH_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048)


def powers_of_two(cap: int, floor: int = 1) -> tuple[int, ...]:
    """floor, 2*floor, ... below `cap`, then `cap` itself (which need not be a power of two)."""
    sizes, size = [], max(1, floor)
    while size < cap:
        sizes.append(size)
        size *= 2
    return tuple(sizes) + (cap,)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n; beyond the largest, the next multiple of it."""
    for b in buckets:
        if n <= b:
            return b
    top = buckets[-1]
    return -(-n // top) * top


def pad_rows(rows: Sequence[Sequence[int]], width: int, pad_id: int, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 (N, width), mask bool) with rows right-aligned when `left` (decoder-only prompts)."""
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"row {i} has {len(row)} tokens, more than the padded width {width}")
        sl = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, sl], mask[i, sl] = row, True
    return ids, mask
