"""The server's step from a vote: schedules and momentum."""

import numpy as np
import pytest

from dpsign_fl.server_update import LR_SCHEDULES, VoteUpdater, learning_rate_at


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
