"""Coordinate-wise majority vote over bit-packed sign updates."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .packing import BIT_ORDER, check_packed, payload_bytes


def majority_vote(packed, num_coordinates: int) -> np.ndarray:
    """Return the coordinate-wise majority of the clients' signs.

    Tie rule: a coordinate with as many +1 as -1 votes (only possible for an even
    number of voters) gets 0, so the server leaves it unchanged this round
    rather than favouring one direction.

    Args:
        packed: a sequence of packed updates (each as :func:`pack_signs` returns)
            or a 2-D uint8 array ``[M, ceil(d/8)]``.
        num_coordinates: d.

    Returns:
        int8 array ``[d]`` with values in {-1, 0, +1}; all zeros when ``M = 0``.

    Raises:
        ValueError: if any payload has the wrong dtype or length.
    """
    matrix = _stack(packed, num_coordinates)
    if matrix.shape[0] == 0:
        return np.zeros(num_coordinates, dtype=np.int8)
    bits = np.unpackbits(matrix, axis=1, count=num_coordinates, bitorder=BIT_ORDER)
    positives = bits.sum(axis=0, dtype=np.int64)
    # Sum of +-1 votes = positives - negatives = 2 * positives - M.
    totals = 2 * positives - matrix.shape[0]
    return np.sign(totals).astype(np.int8)


def vote_counts(packed, num_coordinates: int) -> np.ndarray:
    """Return the sum of the clients' +-1 signs per coordinate (int64 ``[d]``)."""
    matrix = _stack(packed, num_coordinates)
    bits = np.unpackbits(matrix, axis=1, count=num_coordinates, bitorder=BIT_ORDER)
    return 2 * bits.sum(axis=0, dtype=np.int64) - matrix.shape[0]


def _stack(packed, num_coordinates: int) -> np.ndarray:
    expected = payload_bytes(num_coordinates)
    if isinstance(packed, np.ndarray) and packed.ndim == 2:
        if packed.dtype != np.uint8:
            raise ValueError(f"packed signs must have dtype uint8, got {packed.dtype}")
        if packed.shape[1] != expected:
            raise ValueError(
                f"packed signs must have {expected} bytes per row, got shape {packed.shape}"
            )
        return packed
    rows: Sequence = list(packed)
    if not rows:
        return np.zeros((0, expected), dtype=np.uint8)
    return np.stack([check_packed(row, num_coordinates) for row in rows])
