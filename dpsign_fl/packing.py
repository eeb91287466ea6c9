"""Sign vectors <-> bit-packed payloads (the uplink wire format).

Wire format: coordinate ``i`` of the flattened update (parameters in
``model.parameters()`` order, each tensor flattened in row-major order) is bit
``7 - (i % 8)`` of byte ``i // 8``: the most significant bit first, as
``numpy.packbits(..., bitorder="big")``. A set bit means +1, a clear bit -1.
The unused low bits of the last byte are zero. The payload is exactly
``ceil(d / 8)`` bytes.
"""

from __future__ import annotations

import numpy as np

BIT_ORDER = "big"


def payload_bytes(num_coordinates: int) -> int:
    """Return the size in bytes of the packed signs of ``num_coordinates`` coordinates."""
    _check_num_coordinates(num_coordinates)
    return (num_coordinates + 7) // 8


def pack_signs(signs) -> np.ndarray:
    """Pack a vector of signs into bits, one bit per coordinate.

    Args:
        signs: 1-D array-like (numpy or torch) of -1/+1 values.

    Returns:
        uint8 array of ``ceil(d / 8)`` bytes; bit order as in the module docstring.

    Raises:
        ValueError: if ``signs`` is not 1-D or holds values other than -1 and +1.
    """
    array = _to_numpy(signs)
    if array.ndim != 1:
        raise ValueError(f"signs must be 1-D, got shape {array.shape}")
    positive = array == 1
    if not np.all(positive | (array == -1)):
        raise ValueError("signs must hold only -1 and +1 values")
    return np.packbits(positive, bitorder=BIT_ORDER)


def unpack_signs(packed, num_coordinates: int) -> np.ndarray:
    """Unpack bits produced by :func:`pack_signs` into an int8 vector of -1/+1.

    Args:
        packed: 1-D uint8 array of exactly ``ceil(num_coordinates / 8)`` bytes.
        num_coordinates: d, the number of coordinates that were packed.

    Returns:
        int8 array of shape ``[num_coordinates]`` with values in {-1, +1}.

    Raises:
        ValueError: on a wrong dtype, shape or length.
    """
    array = check_packed(packed, num_coordinates)
    bits = np.unpackbits(array, count=num_coordinates, bitorder=BIT_ORDER)
    return (bits.astype(np.int8) * 2 - 1).astype(np.int8)


def check_packed(packed, num_coordinates: int) -> np.ndarray:
    """Validate one packed payload and return it as a numpy array.

    Raises:
        ValueError: if ``packed`` is not a 1-D uint8 array of ``ceil(d/8)`` bytes.
    """
    expected = payload_bytes(num_coordinates)
    array = np.asarray(packed)
    if array.dtype != np.uint8:
        raise ValueError(f"packed signs must have dtype uint8, got {array.dtype}")
    if array.ndim != 1 or array.shape[0] != expected:
        raise ValueError(
            f"packed signs must be a 1-D array of {expected} bytes "
            f"(ceil({num_coordinates}/8)), got shape {array.shape}"
        )
    return array


def _check_num_coordinates(num_coordinates: int) -> None:
    if isinstance(num_coordinates, bool) or not isinstance(num_coordinates, (int, np.integer)):
        raise TypeError(f"num_coordinates must be an int, got {type(num_coordinates).__name__}")
    if num_coordinates < 1:
        raise ValueError(f"num_coordinates must be >= 1, got {num_coordinates}")


def _to_numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):
        return values.detach().cpu().numpy()
    return np.asarray(values)
