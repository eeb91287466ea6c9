"""Tests of dpsign_fl.vote: the coordinate-wise majority vote over packed signs."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpsign_fl.packing import pack_signs, unpack_signs
from dpsign_fl.vote import majority_vote, vote_counts


@st.composite
def client_signs(draw, max_clients=9, max_coordinates=70):
    """A [M, d] int8 matrix of +-1 signs, one row per client."""
    num_clients = draw(st.integers(min_value=1, max_value=max_clients))
    num_coordinates = draw(st.integers(min_value=1, max_value=max_coordinates))
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([-1, 1], dtype=np.int8), size=(num_clients, num_coordinates))


@given(client_signs())
def test_vote_equals_sign_of_summed_unpacked_signs(signs):
    # Arrange: reference written directly from the definition vote_j = sign(sum_m b_mj).
    num_coordinates = signs.shape[1]
    payloads = [pack_signs(row) for row in signs]
    expected = np.sign(np.sum([unpack_signs(p, num_coordinates).astype(np.int64) for p in payloads], axis=0))
    # Act
    vote = majority_vote(payloads, num_coordinates)
    # Assert
    assert vote.dtype == np.int8
    np.testing.assert_array_equal(vote, expected)


@given(client_signs(), st.randoms(use_true_random=False))
def test_vote_does_not_depend_on_client_order(signs, random):
    num_coordinates = signs.shape[1]
    payloads = [pack_signs(row) for row in signs]
    shuffled = list(payloads)
    random.shuffle(shuffled)

    assert np.array_equal(majority_vote(shuffled, num_coordinates), majority_vote(payloads, num_coordinates))


@given(client_signs())
def test_vote_of_2d_array_equals_vote_of_list(signs):
    num_coordinates = signs.shape[1]
    payloads = [pack_signs(row) for row in signs]

    from_array = majority_vote(np.stack(payloads), num_coordinates)
    from_list = majority_vote(payloads, num_coordinates)

    np.testing.assert_array_equal(from_array, from_list)


def test_tie_gives_zero_and_majority_wins_elsewhere():
    # Four clients, five coordinates: 2-2 ties on coordinates 0 and 3,
    # 3-1 for +1 on coordinate 1, 1-3 for -1 on coordinate 2, 4-0 for +1 on 4.
    signs = np.array(
        [
            [1, 1, -1, -1, 1],
            [-1, 1, -1, 1, 1],
            [1, -1, 1, -1, 1],
            [-1, 1, -1, 1, 1],
        ],
        dtype=np.int8,
    )
    payloads = [pack_signs(row) for row in signs]

    vote = majority_vote(payloads, 5)

    np.testing.assert_array_equal(vote, np.array([0, 1, -1, 0, 1], dtype=np.int8))
    np.testing.assert_array_equal(vote_counts(payloads, 5), np.array([0, 2, -2, 0, 4]))


def test_no_clients_gives_all_zero_vote():
    assert np.array_equal(majority_vote([], 11), np.zeros(11, dtype=np.int8))


def test_vote_rejects_payload_of_wrong_length_naming_expected_bytes():
    good = pack_signs(np.ones(20, dtype=np.int8))
    short = good[:2]

    with pytest.raises(ValueError, match="3 bytes"):
        majority_vote([good, short], 20)


def test_vote_rejects_2d_array_of_wrong_dtype_or_width():
    with pytest.raises(ValueError, match="dtype uint8"):
        majority_vote(np.zeros((2, 3), dtype=np.int16), 20)
    with pytest.raises(ValueError, match="3 bytes per row"):
        majority_vote(np.zeros((2, 4), dtype=np.uint8), 20)
