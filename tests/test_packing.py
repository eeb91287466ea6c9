"""Tests of dpsign_fl.vote.packing: packed signs (uplink) and the encoded vote (downlink)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpsign_fl.vote.packing import (
    VOTE_FORMAT_BINARY,
    VOTE_FORMAT_TERNARY,
    pack_signs,
    pack_vote,
    pack_vote_bitmaps,
    payload_bytes,
    unpack_signs,
    unpack_vote,
    vote_payload_bytes,
)


def random_signs(num_coordinates: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([-1, 1], dtype=np.int8), size=num_coordinates)


@st.composite
def sign_vectors(draw, max_coordinates=300):
    num_coordinates = draw(st.integers(min_value=1, max_value=max_coordinates))
    bits = draw(st.lists(st.booleans(), min_size=num_coordinates, max_size=num_coordinates))
    return np.where(np.array(bits), 1, -1).astype(np.int8)


@given(sign_vectors())
def test_unpack_inverts_pack_for_any_length(signs):
    # Arrange: lengths 1..300, most of them not a multiple of 8.
    # Act
    packed = pack_signs(signs)
    unpacked = unpack_signs(packed, len(signs))
    # Assert
    assert unpacked.dtype == np.int8
    np.testing.assert_array_equal(unpacked, signs)


@given(sign_vectors())
def test_payload_is_ceil_d_over_8_bytes_of_uint8(signs):
    packed = pack_signs(signs)

    assert packed.dtype == np.uint8
    assert packed.shape == (math.ceil(len(signs) / 8),)
    assert payload_bytes(len(signs)) == math.ceil(len(signs) / 8)


@pytest.mark.parametrize("num_coordinates", [1, 7, 8, 9, 15, 16, 17, 1001])
def test_round_trip_at_byte_boundaries(num_coordinates):
    signs = random_signs(num_coordinates, seed=num_coordinates)

    unpacked = unpack_signs(pack_signs(signs), num_coordinates)

    np.testing.assert_array_equal(unpacked, signs)


def test_bit_order_is_most_significant_bit_first_with_zero_padding():
    # Golden value written by hand from the documented wire format:
    # coordinate i is bit 7 - (i % 8) of byte i // 8; +1 is a set bit; unused bits are 0.
    signs = np.array([1, -1, -1, -1, -1, -1, -1, 1, 1, 1, -1], dtype=np.int8)

    packed = pack_signs(signs)

    np.testing.assert_array_equal(packed, np.array([0b1000_0001, 0b1100_0000], dtype=np.uint8))


def test_pack_accepts_torch_int8_signs_like_numpy():
    signs = random_signs(37, seed=1)

    from_torch = pack_signs(torch.from_numpy(signs))

    np.testing.assert_array_equal(from_torch, pack_signs(signs))


@pytest.mark.parametrize("bad", [np.array([1, 0, -1]), np.array([1, 2]), np.array([[1, -1], [1, 1]])])
def test_pack_rejects_values_other_than_plus_minus_one_or_not_1d(bad):
    with pytest.raises(ValueError, match="signs must"):
        pack_signs(bad)


def test_unpack_rejects_wrong_dtype_naming_uint8():
    packed = pack_signs(random_signs(20, seed=2)).astype(np.int8)

    with pytest.raises(ValueError, match="dtype uint8, got int8"):
        unpack_signs(packed, 20)


@pytest.mark.parametrize("num_bytes", [2, 4, 0])
def test_unpack_rejects_wrong_length_naming_expected_bytes(num_bytes):
    # d = 20 needs ceil(20 / 8) = 3 bytes.
    packed = np.zeros(num_bytes, dtype=np.uint8)

    with pytest.raises(ValueError, match=r"of 3 bytes \(ceil\(20/8\)\), got shape"):
        unpack_signs(packed, 20)


def test_unpack_rejects_2d_payload():
    packed = np.zeros((1, 3), dtype=np.uint8)

    with pytest.raises(ValueError, match="1-D array of 3 bytes"):
        unpack_signs(packed, 20)


@pytest.mark.parametrize("bad", [0, -3])
def test_payload_bytes_rejects_non_positive_coordinate_count(bad):
    with pytest.raises(ValueError, match=f"num_coordinates must be >= 1, got {bad}"):
        payload_bytes(bad)


@pytest.mark.parametrize("bad", [2.0, "8", True])
def test_payload_bytes_rejects_non_integer_coordinate_count(bad):
    with pytest.raises(TypeError, match="num_coordinates must be an int"):
        payload_bytes(bad)


# --- The downlink vote: tag 0 (binary, 1 bit per coordinate) or tag 1 (5 trits per byte).


@st.composite
def ternary_votes(draw, max_coordinates=300, with_zeros=True):
    """A 1-D int8 vote in {-1, 0, +1} (in {-1, +1} without zeros)."""
    num_coordinates = draw(st.integers(min_value=1, max_value=max_coordinates))
    values = [-1, 0, 1] if with_zeros else [-1, 1]
    return np.array(
        draw(st.lists(st.sampled_from(values), min_size=num_coordinates, max_size=num_coordinates)),
        dtype=np.int8,
    )


@given(ternary_votes())
def test_unpack_vote_inverts_pack_vote_for_any_ternary_vote(vote):
    payload = pack_vote(vote)
    unpacked = unpack_vote(payload, len(vote))

    assert unpacked.dtype == np.int8
    np.testing.assert_array_equal(unpacked, vote)


@given(ternary_votes(with_zeros=False))
def test_vote_without_zeros_is_tag_0_then_the_packed_signs(vote):
    # 1 bit per coordinate: the binary form is exactly pack_signs behind the tag.
    payload = pack_vote(vote)

    assert payload.dtype == np.uint8
    assert payload[0] == VOTE_FORMAT_BINARY
    assert payload.shape == (1 + math.ceil(len(vote) / 8),)
    assert payload.shape[0] == vote_payload_bytes(len(vote), ternary=False)
    np.testing.assert_array_equal(payload[1:], pack_signs(vote))
    np.testing.assert_array_equal(unpack_vote(payload, len(vote)), vote)


@given(ternary_votes(), st.integers(min_value=0, max_value=299))
def test_vote_with_a_zero_is_tag_1_of_1_plus_ceil_d_over_5_bytes(vote, where):
    vote[where % len(vote)] = 0

    payload = pack_vote(vote)

    assert payload[0] == VOTE_FORMAT_TERNARY
    assert payload.shape == (1 + math.ceil(len(vote) / 5),)
    assert payload.shape[0] == vote_payload_bytes(len(vote), ternary=True)
    assert payload[1:].max() <= 242


@given(ternary_votes())
def test_pack_vote_bitmaps_writes_the_same_bytes_as_pack_vote(vote):
    positive = np.packbits(vote == 1, bitorder="big")
    negative = np.packbits(vote == -1, bitorder="big")

    from_bitmaps = pack_vote_bitmaps(positive, negative, len(vote))

    np.testing.assert_array_equal(from_bitmaps, pack_vote(vote))


def test_ternary_vote_golden_bytes():
    # Written by hand from the module docstring: t = vote + 1, byte = sum_k t_k 3**k.
    # Group 0: t = (2, 0, 1, 1, 2) -> 2 + 0 + 9 + 27 + 162 = 200.
    # Group 1: t = (0, 1, 1, 1, 1), padded with t = 1 -> 0 + 3 + 9 + 27 + 81 = 120.
    vote = np.array([1, -1, 0, 0, 1, -1], dtype=np.int8)

    np.testing.assert_array_equal(pack_vote(vote), np.array([1, 200, 120], dtype=np.uint8))


def test_binary_vote_golden_bytes():
    vote = np.array([1, -1, 1], dtype=np.int8)

    np.testing.assert_array_equal(pack_vote(vote), np.array([0, 0b1010_0000], dtype=np.uint8))


def test_pack_vote_accepts_torch_votes_like_numpy():
    vote = np.array([1, 0, -1, 1, 1, 0, -1], dtype=np.int8)

    np.testing.assert_array_equal(pack_vote(torch.from_numpy(vote)), pack_vote(vote))


@pytest.mark.parametrize(
    ("num_coordinates", "ternary", "expected"),
    [
        (1, False, 2),
        (8, False, 2),
        (9, False, 3),
        (1, True, 2),
        (5, True, 2),
        (6, True, 3),
        (1001, True, 202),
    ],
)
def test_vote_payload_bytes_is_tag_plus_ceil_d_over_8_or_5(num_coordinates, ternary, expected):
    assert vote_payload_bytes(num_coordinates, ternary=ternary) == expected


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.array([1, 2, -1]), "only -1, 0 and \\+1"),
        (np.array([0.5, 1.0]), "only -1, 0 and \\+1"),
        (np.zeros((2, 3), dtype=np.int8), "1-D with at least 1 coordinate"),
        (np.zeros(0, dtype=np.int8), "1-D with at least 1 coordinate"),
    ],
)
def test_pack_vote_rejects_other_values_or_shapes(bad, message):
    with pytest.raises(ValueError, match=message):
        pack_vote(bad)


def u8(*values):
    return np.array(values, dtype=np.uint8)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        # d = 12: binary is 1 + 2 bytes, ternary 1 + 3 bytes; 121 = five trits 1 (votes 0).
        (u8(), "non-empty 1-D array"),
        (np.zeros((1, 3), dtype=np.uint8), "non-empty 1-D array"),
        (np.zeros(3, dtype=np.int8), "dtype uint8, got int8"),
        (u8(2, 0, 0), r"tag must be 0 \(binary\) or 1 \(ternary\), got 2"),
        (u8(0, 0, 0, 0), "binary vote payload of 12 coordinates must have 3 bytes, got 4"),
        (u8(1, 121, 121), "ternary vote payload of 12 coordinates must have 4 bytes, got 3"),
        (u8(1, 121, 243, 121), r"<= 242 \(3\*\*5 - 1\), got 243 at byte 2"),
        (u8(1, 121, 121, 255), "<= 242"),
        # The low 4 bits of the last byte would be coordinates 12..15.
        (u8(0, 0, 0b0000_1111), "set bit past coordinate 12"),
        # Last byte: coordinates 10, 11, then padding trits (2, 0, 0) instead of (1, 1, 1).
        (u8(1, 121, 121, 1 + 1 * 3 + 2 * 9), "pad past coordinate 12 with vote 0"),
    ],
)
def test_unpack_vote_rejects_bad_payloads_naming_the_problem(payload, message):
    with pytest.raises(ValueError, match=message):
        unpack_vote(payload, 12)


def test_unpack_vote_accepts_the_canonical_padding_of_the_rejected_payloads():
    # Negative control for the two canonical-form checks above: the same
    # payloads with zero tail bits / padding trits 1 decode.
    np.testing.assert_array_equal(unpack_vote(u8(0, 0, 0), 12), -np.ones(12))
    padded = u8(1, 121, 121, 1 + 1 * 3 + 1 * 9 + 1 * 27 + 1 * 81)
    np.testing.assert_array_equal(unpack_vote(padded, 12), np.zeros(12))


@pytest.mark.parametrize(
    ("positive", "negative", "message"),
    [
        # d = 12 -> 2 bytes per bitmap; the last byte holds coordinates 8..11 in its top 4 bits.
        ([0b1000_0000, 0], [0b1000_0000, 0], "must not share a coordinate"),
        ([0, 0b0000_0001], [0, 0], "positive must have no set bit past coordinate 12"),
        ([0, 0], [0, 0b0000_1000], "negative must have no set bit past coordinate 12"),
        ([0, 0, 0], [0, 0], "positive must be a 1-D array of 2 bytes"),
    ],
)
def test_pack_vote_bitmaps_rejects_bad_bitmaps_naming_the_problem(positive, negative, message):
    with pytest.raises(ValueError, match=message):
        pack_vote_bitmaps(u8(*positive), u8(*negative), 12)
