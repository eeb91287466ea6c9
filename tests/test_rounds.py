"""The release planner: how many releases a client plans for, and the sigma it plans them with."""

import math

import numpy as np
import pytest

from dpsign_fl.privacy import calibrate_noise_multiplier
from dpsign_fl.rounds import plan_release, planned_releases
from dpsign_fl.settings import RunSettings


def expected_count(num_rounds, participation):
    # Written out here from docs/privacy.md, not imported: T p plus 3 standard deviations of
    # Binomial(T, p), rounded up, within [1, T].
    mean = num_rounds * participation
    return min(num_rounds, max(1, math.ceil(mean + 3 * math.sqrt(mean * (1 - participation)))))


@pytest.mark.parametrize(
    "num_rounds, participation, count",
    [
        (1000, 10 / 42, 279),  # 238.1 + 3 * 13.47 = 278.5: 10 of 42 clients a round
        (200, 10 / 42, 66),  # 47.6 + 3 * 6.02 = 65.7
        (60, 0.25, 26),  # 15 + 3 * 3.35 = 25.06
        (60, 0.99, 60),  # 59.4 + 2.3 would pass T: a client releases at most once a round
        (60, 1e-6, 1),  # at least one release
        (60, 1.0, 60),  # every round: T, as before
    ],
)
def test_planned_count_is_the_mean_plus_three_standard_deviations_within_one_and_t(num_rounds, participation, count):
    settings = RunSettings(num_rounds=num_rounds, participation=participation)
    assert expected_count(num_rounds, participation) == count
    assert planned_releases(settings) == count


@pytest.mark.parametrize(
    "num_rounds, participation, margin, count",
    [
        (1000, 20 / 1049, 0.0, 20),  # 19.07 rounded up: 20 of 1,049 roles a round, every role drawn 19 or 20 times
        (1000, 20 / 1049, 2.0, 28),  # 19.07 + 2 * 4.32 = 27.7
        (1000, 20 / 1049, 3.0, 33),  # 19.07 + 3 * 4.32 = 32.0: the default
        (60, 0.25, 0.0, 15),  # exactly T p
        (60, 1.0, 0.0, 60),  # every round: T, whatever the margin
    ],
)
def test_the_margin_is_a_setting_and_zero_plans_exactly_t_p_rounded_up(num_rounds, participation, margin, count):
    settings = RunSettings(num_rounds=num_rounds, participation=participation, participation_margin=margin)
    assert planned_releases(settings) == count
    assert RunSettings().participation_margin == 3.0


def test_least_drawn_takes_the_smallest_counts_and_breaks_ties_at_random():
    from dpsign_fl.rounds import least_drawn

    rng = np.random.default_rng(0)
    assert least_drawn([3, 0, 2, 0, 1], 3, rng) == [1, 3, 4]  # both zeros, then the one
    assert least_drawn([1, 1, 1], 0, rng) == []
    ties = {tuple(least_drawn([0] * 6, 2, rng)) for _ in range(50)}
    assert len(ties) > 5  # ties broken differently from call to call, not always the first positions
    with pytest.raises(ValueError, match=r"k must be in \[0, 3\], got 4"):
        least_drawn([0, 0, 0], 4, rng)


@pytest.mark.parametrize("participation", [0.25, 1.0])
def test_planned_sigma_is_the_calibrated_sigma_for_the_planned_count(participation):
    settings = RunSettings(num_rounds=60, sample_rate=0.3, target_epsilon=2.0, participation=participation)
    count = expected_count(60, participation)

    plan = plan_release(settings)

    assert plan.num_releases == count
    assert plan.release.noise_multiplier == calibrate_noise_multiplier(
        target_epsilon=2.0, target_delta=settings.target_delta, sample_rate=0.3, num_steps=count
    )


def test_planning_for_partial_participation_needs_less_noise_than_for_every_round():
    every_round = plan_release(RunSettings(num_rounds=60, sample_rate=0.3, target_epsilon=2.0))
    quarter = plan_release(RunSettings(num_rounds=60, sample_rate=0.3, target_epsilon=2.0, participation=0.25))
    assert quarter.release.noise_multiplier < 0.9 * every_round.release.noise_multiplier


def test_server_round_with_a_memory_leaves_out_a_sender_that_repeats_its_push_and_reads_identities_after_the_payloads():
    import numpy as np

    from dpsign_fl.rounds import server_round
    from dpsign_fl.vote import VoteMemory
    from dpsign_fl.vote.robust import REPETITION_HORIZON
    from dpsign_fl.vote.server_update import VoteUpdater
    from tests.test_robust_vote import D, adaptive_push_rounds

    _, attacked = adaptive_push_rounds(2 * REPETITION_HORIZON)
    updater = VoteUpdater(learning_rate=0.1)
    weights = np.zeros(D, dtype=np.float32)
    updater.start(weights)
    memory = VoteMemory(np.random.default_rng(2))

    def senders(payloads, tally):  # as the strategy's tally: each identity known only once its payload is read
        for node, payload in enumerate(payloads):
            tally.append(1000 + node)
            yield payload

    results = []
    for t, payloads in enumerate(attacked, start=1):
        tally = []
        results.append(server_round(weights, senders(payloads, tally), updater=updater, server_round=t,
                                    num_rounds=len(attacked), memory=memory, identities=tally))
    stateless = server_round(weights, attacked[-1], updater=updater, server_round=1, num_rounds=1)

    assert results[-1].excluded == {i: "repetition" for i in range(4)}
    assert stateless.excluded == {}  # negative control: without the memory the last round keeps every attacker
