"""The server's step from a vote: schedules and momentum."""

import numpy as np
import pytest

from dpsign_fl.vote.server_update import LR_SCHEDULES, VoteUpdater, learning_rate_at


def test_constant_schedule_keeps_the_learning_rate():
    assert [learning_rate_at(t, learning_rate=0.1, num_rounds=5) for t in (1, 3, 5)] == [0.1, 0.1, 0.1]


def test_linear_schedule_goes_from_eta_to_eta_over_t():
    rates = [learning_rate_at(t, learning_rate=1.0, num_rounds=4, schedule="linear") for t in range(1, 5)]
    assert rates == pytest.approx([1.0, 0.75, 0.5, 0.25])


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
def test_every_schedule_is_positive_and_non_increasing(schedule):
    rates = [learning_rate_at(t, learning_rate=0.3, num_rounds=50, schedule=schedule) for t in range(1, 60)]
    assert all(r > 0 for r in rates)
    assert all(b <= a + 1e-15 for a, b in zip(rates, rates[1:]))


def test_unknown_schedule_is_rejected_naming_the_key():
    with pytest.raises(ValueError, match="lr_schedule"):
        learning_rate_at(1, learning_rate=0.1, num_rounds=3, schedule="step")


def test_step_without_momentum_is_w_minus_eta_vote():
    updater = VoteUpdater(learning_rate=0.5)
    weights = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    vote = np.array([1, 0, -1], dtype=np.int8)
    np.testing.assert_allclose(updater.step(weights, vote, 1, 3), [0.5, 2.0, 3.5])


def test_momentum_state_round_trips_through_state_dict():
    updater = VoteUpdater(learning_rate=0.1, momentum=0.9)
    weights = np.zeros(4, dtype=np.float32)
    vote = np.array([1, -1, 1, 0], dtype=np.int8)
    weights = updater.step(weights, vote, 1, 10)
    clone = VoteUpdater(learning_rate=0.1, momentum=0.9)
    clone.load_state_dict(updater.state_dict())
    np.testing.assert_allclose(clone.step(weights, vote, 2, 10), updater.step(weights, vote, 2, 10))


def test_automatic_steps_grow_where_votes_agree_and_stay_small_where_they_flip():
    d = 4
    updater = VoteUpdater(learning_rate=0.0)
    updater.start(np.full(d, 0.5, dtype=np.float32))
    assert updater.step_scale == pytest.approx(0.5)  # the initial weights' root mean square
    weights = np.zeros(d, dtype=np.float32)
    rng = np.random.default_rng(0)
    moved = np.zeros(d)
    for t in range(1, 201):
        vote = np.array([1, 1, rng.choice([-1, 1]), 0], dtype=np.int8)  # steady, steady, coin flips, tie
        new = updater.step(weights, vote, t, 200)
        moved += np.abs(new - weights)
        weights = new
    # Coin-flip votes still step about 0.3 s (the running agreement fluctuates around 0 with std ~0.23), a third
    # of a steady coordinate's: measured 29.4 vs 98.8 here.
    assert moved[0] == moved[1] > 2.5 * moved[2] > 0
    assert moved[3] == 0
    # A steady coordinate ends at the full step c + f (in units of the scale), a coin-flip one near the floor.
    last = np.abs(updater.step(weights, np.array([1, 1, 1, 0], np.int8), 201, 200) - weights)
    assert last[0] == pytest.approx(0.5 * (1.0 + 0.02), rel=1e-3)


def test_automatic_steps_refuse_momentum_and_need_a_step_scale():
    with pytest.raises(ValueError, match="server_momentum must be 0 with automatic steps"):
        VoteUpdater(learning_rate=0.0, momentum=0.5)
    with pytest.raises(RuntimeError, match="start"):
        VoteUpdater(learning_rate=0.0).step(np.zeros(3, np.float32), np.ones(3, np.int8), 1, 10)


def test_automatic_state_round_trips_and_replays_bit_for_bit():
    rng = np.random.default_rng(1)
    votes = [rng.choice(np.array([-1, 0, 1], np.int8), size=1000) for _ in range(30)]
    first = VoteUpdater(learning_rate=0.0, schedule="linear")
    start = rng.standard_normal(1000).astype(np.float32)
    first.start(start)
    weights = start
    for t, vote in enumerate(votes[:10], 1):
        weights = first.step(weights, vote, t, 30)
    second = VoteUpdater(learning_rate=0.0, schedule="linear")
    second.load_state_dict(first.state_dict())
    a, b = weights, weights.copy()
    for t, vote in enumerate(votes[10:], 11):
        a, b = first.step(a, vote, t, 30), second.step(b, vote, t, 30)
    assert a.tobytes() == b.tobytes()
