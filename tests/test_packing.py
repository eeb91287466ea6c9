"""Tests of dpsign_fl.packing: signs <-> bit-packed payloads (the uplink wire format)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpsign_fl.packing import pack_signs, payload_bytes, unpack_signs


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
