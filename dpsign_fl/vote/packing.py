"""Sign vectors <-> bit-packed payloads: the uplink signs and the downlink vote.

Uplink wire format (:func:`pack_signs`): coordinate ``i`` of the flattened
update (parameters in ``model.parameters()`` order, each tensor flattened in
row-major order) is bit ``7 - (i % 8)`` of byte ``i // 8``: the most
significant bit first, as ``numpy.packbits(..., bitorder="big")``. A set bit
means +1, a clear bit -1. The unused low bits of the last byte are zero. The
payload is exactly ``ceil(d / 8)`` bytes.

Downlink vote format (:func:`pack_vote`): the vote is ternary (a tie votes 0),
so its payload starts with a one-byte format tag.

- Tag 0, binary: no coordinate is 0. The tag is followed by the vote's signs
  exactly as :func:`pack_signs` packs them: ``1 + ceil(d / 8)`` bytes, 1 bit
  per coordinate.
- Tag 1, ternary: the tag is followed by ``ceil(d / 5)`` bytes, 5 trits per
  byte. With ``t = vote + 1`` in {0, 1, 2}, byte ``g`` is
  ``sum_k t[5 g + k] * 3**k`` for ``k = 0..4`` (so at most ``3**5 - 1 = 242``),
  and the last group is padded with ``t = 1`` (vote 0). 1.6 bits per
  coordinate, the closest byte-aligned packing to ``log2(3) = 1.585``.

:func:`pack_vote` writes the binary form whenever no coordinate is 0 (always,
for an odd number of voters and no threshold shift), else the ternary one.
:func:`unpack_vote` accepts only what :func:`pack_vote` writes: a set bit past
coordinate ``d`` of a binary payload, or padding other than ``t = 1`` in a
ternary one, is rejected, so each vote has exactly one encoding.
"""

from __future__ import annotations

import numpy as np

BIT_ORDER = "big"

VOTE_FORMAT_BINARY = 0
VOTE_FORMAT_TERNARY = 1

_TRITS_PER_BYTE = 5
_MAX_TRIT_BYTE = 3**_TRITS_PER_BYTE - 1  # 242
_PADDING_TRIT = 1  # vote 0


def _trit_table() -> np.ndarray:
    """Return the read-only int8 ``[243, 5]`` table of the 5 votes each trit byte encodes."""
    values = np.arange(_MAX_TRIT_BYTE + 1)
    table = np.stack([(values // 3**k) % 3 - 1 for k in range(_TRITS_PER_BYTE)], axis=1)
    table = table.astype(np.int8)
    table.flags.writeable = False
    return table


_VOTES_OF_TRIT_BYTE = _trit_table()


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


def check_packed(packed, num_coordinates: int, name: str = "packed signs") -> np.ndarray:
    """Validate one packed payload and return it as a numpy array.

    Args:
        packed: the payload.
        num_coordinates: d.
        name: what the payload is called in error messages.

    Raises:
        ValueError: if ``packed`` is not a 1-D uint8 array of ``ceil(d/8)`` bytes.
    """
    expected = payload_bytes(num_coordinates)
    array = np.asarray(packed)
    if array.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8, got {array.dtype}")
    if array.ndim != 1 or array.shape[0] != expected:
        raise ValueError(
            f"{name} must be a 1-D array of {expected} bytes "
            f"(ceil({num_coordinates}/8)), got shape {array.shape}"
        )
    return array


def vote_payload_bytes(num_coordinates: int, *, ternary: bool) -> int:
    """Return the size in bytes of an encoded vote (see the module docstring).

    Args:
        num_coordinates: d.
        ternary: whether the vote has a 0 coordinate (tag 1) or not (tag 0).

    Returns:
        ``1 + ceil(d / 5)`` if ``ternary``, else ``1 + ceil(d / 8)``.
    """
    _check_num_coordinates(num_coordinates)
    if ternary:
        return 1 + -(-num_coordinates // _TRITS_PER_BYTE)
    return 1 + payload_bytes(num_coordinates)


def pack_vote(vote) -> np.ndarray:
    """Encode a ternary vote for the downlink (format in the module docstring).

    Args:
        vote: 1-D array-like (numpy or torch) of -1/0/+1 values, d >= 1.

    Returns:
        uint8 array: the tag, then ``ceil(d/8)`` sign bytes if no coordinate
        is 0, else ``ceil(d/5)`` trit bytes.

    Raises:
        ValueError: if ``vote`` is not 1-D, is empty, or holds values other
            than -1, 0 and +1.
    """
    array = _to_numpy(vote)
    if array.ndim != 1 or array.shape[0] == 0:
        raise ValueError(f"vote must be 1-D with at least 1 coordinate, got shape {array.shape}")
    positive, negative = array == 1, array == -1
    if not np.all(positive | negative | (array == 0)):
        raise ValueError("vote must hold only -1, 0 and +1 values")
    if np.all(positive | negative):
        return _with_tag(VOTE_FORMAT_BINARY, np.packbits(positive, bitorder=BIT_ORDER))
    trits = positive.view(np.uint8) + np.uint8(_PADDING_TRIT)
    trits -= negative.view(np.uint8)
    return _with_tag(VOTE_FORMAT_TERNARY, _pack_trits(trits))


def pack_vote_bitmaps(positive, negative, num_coordinates: int) -> np.ndarray:
    """Encode a vote given as packed bitmaps of its +1 and -1 coordinates.

    The bytes are those :func:`pack_vote` writes for the same vote. Without a
    0 coordinate (the usual case) the +1 bitmap is the payload as it is;
    only the ternary form unpacks the bitmaps.

    Args:
        positive: packed bitmap (as :func:`pack_signs` lays it out) of the
            coordinates that vote +1, e.g. from
            :meth:`dpsign_fl.vote.counter.VoteCounter.vote_bitmaps`.
        negative: packed bitmap of the coordinates that vote -1.
        num_coordinates: d.

    Returns:
        uint8 array, as :func:`pack_vote` returns.

    Raises:
        ValueError: if a bitmap is not a 1-D uint8 array of ``ceil(d/8)``
            bytes, has a set bit past coordinate d, or if the two bitmaps
            share a coordinate.
    """
    positive = check_packed(positive, num_coordinates, name="positive")
    negative = check_packed(negative, num_coordinates, name="negative")
    tail = np.uint8(~last_byte_mask(num_coordinates) & 0xFF)
    for name, bitmap in (("positive", positive), ("negative", negative)):
        if bitmap[-1] & tail:
            raise ValueError(f"{name} must have no set bit past coordinate {num_coordinates}")
    if np.any(positive & negative):
        raise ValueError("positive and negative must not share a coordinate")
    voted = np.bitwise_or(positive, negative)
    if np.all(voted[:-1] == 0xFF) and voted[-1] == last_byte_mask(num_coordinates):
        return _with_tag(VOTE_FORMAT_BINARY, positive)
    trits = np.unpackbits(positive, count=num_coordinates, bitorder=BIT_ORDER)
    trits += np.uint8(_PADDING_TRIT)
    trits -= np.unpackbits(negative, count=num_coordinates, bitorder=BIT_ORDER)
    return _with_tag(VOTE_FORMAT_TERNARY, _pack_trits(trits))


def unpack_vote(payload, num_coordinates: int) -> np.ndarray:
    """Decode a vote written by :func:`pack_vote`.

    Args:
        payload: 1-D uint8 array: a format tag, then the signs or the trits.
        num_coordinates: d.

    Returns:
        int8 array ``[d]`` with values in {-1, 0, +1}.

    Raises:
        ValueError: on a wrong dtype or shape, an unknown tag, a length that
            does not match the tag and d, a trit byte above 242, a set bit past
            coordinate d (binary), or padding other than vote 0 (ternary).
    """
    _check_num_coordinates(num_coordinates)
    array = np.asarray(payload)
    if array.dtype != np.uint8:
        raise ValueError(f"vote payload must have dtype uint8, got {array.dtype}")
    if array.ndim != 1 or array.shape[0] == 0:
        raise ValueError(f"vote payload must be a non-empty 1-D array, got shape {array.shape}")
    tag = int(array[0])
    if tag not in (VOTE_FORMAT_BINARY, VOTE_FORMAT_TERNARY):
        raise ValueError(
            f"vote payload tag must be {VOTE_FORMAT_BINARY} (binary) or "
            f"{VOTE_FORMAT_TERNARY} (ternary), got {tag}"
        )
    ternary = tag == VOTE_FORMAT_TERNARY
    expected = vote_payload_bytes(num_coordinates, ternary=ternary)
    if array.shape[0] != expected:
        form = "ternary" if ternary else "binary"
        raise ValueError(
            f"{form} vote payload of {num_coordinates} coordinates must have {expected} bytes, "
            f"got {array.shape[0]}"
        )
    body = array[1:]
    if not ternary:
        if body[-1] & np.uint8(~last_byte_mask(num_coordinates) & 0xFF):
            raise ValueError(
                f"binary vote payload has a set bit past coordinate {num_coordinates}"
            )
        return unpack_signs(body, num_coordinates)
    too_large = np.flatnonzero(body > _MAX_TRIT_BYTE)
    if too_large.size:
        index = int(too_large[0])
        raise ValueError(
            f"ternary vote payload bytes must be <= {_MAX_TRIT_BYTE} (3**5 - 1), "
            f"got {int(body[index])} at byte {index + 1}"
        )
    votes = _VOTES_OF_TRIT_BYTE[body].reshape(-1)
    if np.any(votes[num_coordinates:] != _PADDING_TRIT - 1):
        raise ValueError(
            f"ternary vote payload must pad past coordinate {num_coordinates} with vote 0"
        )
    return votes[:num_coordinates].copy()


def _pack_trits(trits: np.ndarray) -> np.ndarray:
    """Pack uint8 trits in {0, 1, 2}, 5 per byte, least significant trit first."""
    num_groups = -(-trits.shape[0] // _TRITS_PER_BYTE)
    groups = np.full(num_groups * _TRITS_PER_BYTE, _PADDING_TRIT, dtype=np.uint8)
    groups[: trits.shape[0]] = trits
    groups = groups.reshape(num_groups, _TRITS_PER_BYTE)
    # Horner from the most significant trit; 242 fits in uint8.
    packed = groups[:, -1].copy()
    for k in range(_TRITS_PER_BYTE - 2, -1, -1):
        packed *= np.uint8(3)
        packed += groups[:, k]
    return packed


def _with_tag(tag: int, body: np.ndarray) -> np.ndarray:
    payload = np.empty(body.shape[0] + 1, dtype=np.uint8)
    payload[0] = tag
    payload[1:] = body
    return payload


def last_byte_mask(num_coordinates: int) -> int:
    """Return the bits of the last packed byte that hold coordinates (the rest are zero)."""
    used = num_coordinates % 8 or 8
    return (0xFF << (8 - used)) & 0xFF


def _check_num_coordinates(num_coordinates: int) -> None:
    if isinstance(num_coordinates, bool) or not isinstance(num_coordinates, (int, np.integer)):
        raise TypeError(f"num_coordinates must be an int, got {type(num_coordinates).__name__}")
    if num_coordinates < 1:
        raise ValueError(f"num_coordinates must be >= 1, got {num_coordinates}")


def _to_numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):
        return values.detach().cpu().numpy()
    return np.asarray(values)
