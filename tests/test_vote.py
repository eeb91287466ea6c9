"""Tests of dpsign_fl.vote: the coordinate-wise majority vote over packed signs."""

import tracemalloc
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpsign_fl.vote import counter as vote_module
from dpsign_fl.vote.packing import pack_signs, unpack_signs
from dpsign_fl.vote import VoteCounter, majority_vote, vote_counts


pytestmark = pytest.mark.usefixtures("both_vote_kernels")


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


# --- VoteCounter: the streaming, bit-sliced count, against a one-payload-at-a-time reference.

# Edges of the 16-row adder tree (15, 16, 17) and of the 32-row batch (31, 32,
# 33, 48, 49), plane edges (2**k - 1, 2**k).
EDGE_VOTER_COUNTS = [0, 1, 2, 15, 16, 17, 31, 32, 33, 48, 49, 64, 255, 256, 300]


def reference_positive_counts(payloads, num_coordinates):
    """Count the +1 votes per coordinate by unpacking one payload at a time."""
    counts = np.zeros(num_coordinates, dtype=np.int64)
    for payload in payloads:
        counts += unpack_signs(payload, num_coordinates) == 1
    return counts


def random_payloads(num_voters, num_coordinates, seed, positive_rate=0.5):
    rng = np.random.default_rng(seed)
    positive = rng.random((num_voters, num_coordinates)) < positive_rate
    signs = np.where(positive, 1, -1).astype(np.int8)
    return [pack_signs(row) for row in signs]


def counter_of(payloads, num_coordinates):
    counter = VoteCounter(num_coordinates)
    for payload in payloads:
        counter.add(payload)
    return counter


@st.composite
def votes_with_shift(draw, max_coordinates=150):
    """(payloads, d, shift): M in 0..300 with the edges above; d not a multiple of 8 (nor 64)."""
    num_voters = draw(st.one_of(st.sampled_from(EDGE_VOTER_COUNTS), st.integers(0, 300)))
    num_coordinates = 8 * draw(st.integers(0, max_coordinates // 8)) + draw(st.integers(1, 7))
    # Rates 0 and 1 drive counts to 0 and M, the ends of the top plane.
    positive_rate = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    shift = draw(st.one_of(st.integers(-3, 3), st.integers(-num_voters - 2, num_voters + 2)))
    return random_payloads(num_voters, num_coordinates, seed, positive_rate), num_coordinates, shift


def assert_counter_matches_reference(counter, payloads, num_coordinates, shift):
    expected_counts = reference_positive_counts(payloads, num_coordinates)
    expected_vote = np.sign(2 * expected_counts - len(payloads) - shift)

    positive, negative = counter.vote_bitmaps(shift)

    assert counter.num_voters == len(payloads)
    np.testing.assert_array_equal(counter.positive_counts(), expected_counts)
    assert counter.total_positives() == int(expected_counts.sum())
    vote = counter.vote(shift)
    assert vote.dtype == np.int8
    np.testing.assert_array_equal(vote, expected_vote)
    # The bitmaps are the vote's +1 and -1 masks in the wire bit order, tail bits zero.
    np.testing.assert_array_equal(positive, np.packbits(expected_vote == 1, bitorder="big"))
    np.testing.assert_array_equal(negative, np.packbits(expected_vote == -1, bitorder="big"))


@settings(max_examples=60, deadline=None)
@given(votes_with_shift())
def test_counter_equals_unpack_and_sum_for_any_voter_count_and_shift(case):
    payloads, num_coordinates, shift = case

    counter = counter_of(payloads, num_coordinates)

    assert_counter_matches_reference(counter, payloads, num_coordinates, shift)


@pytest.mark.parametrize("num_voters", EDGE_VOTER_COUNTS)
@pytest.mark.parametrize("num_coordinates", [1, 8, 64, 77, 1001])
def test_counter_equals_unpack_and_sum_at_batch_and_plane_edges(num_voters, num_coordinates):
    payloads = random_payloads(num_voters, num_coordinates, seed=num_voters)
    counter = counter_of(payloads, num_coordinates)

    for shift in (0, 1, -1):
        assert_counter_matches_reference(counter, payloads, num_coordinates, shift)


@settings(max_examples=30, deadline=None)
@given(votes_with_shift(max_coordinates=100))
def test_counter_is_exact_across_block_boundaries(case):
    # 3-byte blocks put several block edges inside every payload.
    payloads, num_coordinates, shift = case
    with mock.patch.object(vote_module, "_BLOCK_BYTES", 3):
        counter = counter_of(payloads, num_coordinates)

        assert_counter_matches_reference(counter, payloads, num_coordinates, shift)


def test_counter_is_exact_over_two_real_blocks_and_a_partial_byte():
    # 2 * 64 KiB of whole bytes plus 13 coordinates: two full blocks, a short one, a tail.
    num_coordinates = 2 * 8 * vote_module._BLOCK_BYTES + 8 * 1000 + 5
    payloads = random_payloads(17, num_coordinates, seed=7)

    counter = counter_of(payloads, num_coordinates)

    assert_counter_matches_reference(counter, payloads, num_coordinates, shift=1)


def with_tail_bits_set(payload, num_coordinates):
    dirty = payload.copy()
    dirty[-1] |= (1 << (8 - num_coordinates % 8)) - 1
    return dirty


@settings(max_examples=40, deadline=None)
@given(votes_with_shift())
def test_set_tail_bits_in_payloads_never_count(case):
    payloads, num_coordinates, shift = case
    dirty = [with_tail_bits_set(payload, num_coordinates) for payload in payloads]

    counter = counter_of(dirty, num_coordinates)

    assert_counter_matches_reference(counter, payloads, num_coordinates, shift)


def test_negative_control_an_unmasked_counter_counts_the_tail_bits():
    # The same dirty payloads read as 8 * ceil(d/8) coordinates (so no tail to
    # mask) give more positives than the reference: the tail-bit test above can fail.
    num_coordinates = 77
    payloads = random_payloads(20, num_coordinates, seed=3)
    dirty = [with_tail_bits_set(payload, num_coordinates) for payload in payloads]

    unmasked = counter_of(dirty, 8 * len(payloads[0]))
    masked = counter_of(dirty, num_coordinates)

    reference = int(reference_positive_counts(payloads, num_coordinates).sum())
    assert masked.total_positives() == reference
    assert unmasked.total_positives() == reference + 20 * 3


@settings(max_examples=40, deadline=None)
@given(votes_with_shift())
def test_negating_every_row_negates_the_vote(case):
    # c -> n - c, so sign(2c - n - s) -> -sign(2c - n + s): the shift flips too.
    payloads, num_coordinates, shift = case
    negated = [pack_signs(-unpack_signs(payload, num_coordinates)) for payload in payloads]

    vote = counter_of(payloads, num_coordinates).vote(shift)
    negated_vote = counter_of(negated, num_coordinates).vote(-shift)

    np.testing.assert_array_equal(negated_vote, -vote)


def test_tie_votes_zero_and_shift_moves_the_threshold():
    # Four voters; +1 counts per coordinate (2, 3, 1, 0, 4), written by hand.
    signs = np.array(
        [[1, 1, -1, -1, 1], [-1, 1, -1, -1, 1], [1, -1, 1, -1, 1], [-1, 1, -1, -1, 1]],
        dtype=np.int8,
    )
    counter = counter_of([pack_signs(row) for row in signs], 5)

    np.testing.assert_array_equal(counter.vote(), [0, 1, -1, -1, 1])  # sign(2c - 4)
    np.testing.assert_array_equal(counter.vote(shift=2), [-1, 0, -1, -1, 1])  # sign(2c - 6)
    np.testing.assert_array_equal(counter.vote(shift=-2), [1, 1, 0, -1, 1])  # sign(2c - 2)


def test_no_voters_votes_minus_sign_of_shift_with_zero_tail_bits():
    counter = VoteCounter(11)

    np.testing.assert_array_equal(counter.vote(), np.zeros(11))
    np.testing.assert_array_equal(counter.vote(shift=1), -np.ones(11))
    positive, negative = counter.vote_bitmaps(shift=-1)
    np.testing.assert_array_equal(positive, [0xFF, 0b1110_0000])
    np.testing.assert_array_equal(negative, [0, 0])
    assert counter.total_positives() == 0


def test_counter_rejects_bad_payloads_and_arguments_naming_them():
    counter = VoteCounter(20)

    with pytest.raises(ValueError, match=r"1-D array of 3 bytes \(ceil\(20/8\)\)"):
        counter.add(np.zeros(2, dtype=np.uint8))
    with pytest.raises(ValueError, match="dtype uint8, got int16"):
        counter.add(np.zeros(3, dtype=np.int16))
    with pytest.raises(TypeError, match="shift must be an int, got float"):
        counter.vote(shift=0.5)
    with pytest.raises(ValueError, match="num_coordinates must be >= 1, got 0"):
        VoteCounter(0)
    assert counter.num_voters == 0


def test_counter_memory_stays_below_ten_bytes_per_coordinate_for_any_voter_count():
    num_coordinates = 400_003
    payloads = random_payloads(2, num_coordinates, seed=0)
    peaks = {}
    for num_voters in (17, 300):
        tracemalloc.start()
        try:
            counter = counter_of([payloads[m % 2] for m in range(num_voters)], num_coordinates)
            counter.vote()
            peaks[num_voters] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert peaks[300] < 10 * num_coordinates
    # O(d), not O(M * d): 283 more voters add only the planes 5..8 (under 1 byte/coordinate).
    assert peaks[300] - peaks[17] < num_coordinates
