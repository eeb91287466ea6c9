"""The robust vote: it recovers the honest direction where plain majority does not, and costs nothing without attackers.

Synthetic sign vectors stand for DP-SIGN releases: every honest client sends
noisy signs around one common direction, with a signal that varies by
coordinate (most coordinates are close to coin flips under DP noise, some are
not), and attackers send what each attack sends (dpsign_fl.attacks).
"""

import numpy as np
import pytest
import torch

from dpsign_fl.attacks import attack_round
from dpsign_fl.packing import pack_signs
from dpsign_fl.vote import majority_vote, robust_vote

pytestmark = pytest.mark.usefixtures("both_vote_kernels")

D = 40_000


def honest_payloads(count, seed):
    rng = np.random.default_rng(seed)
    direction = rng.choice(np.array([-1, 1], dtype=np.int8), size=D)
    agreement = rng.choice([0.5, 0.6, 0.9], p=[0.6, 0.3, 0.1], size=D)  # P(client's sign = direction)
    payloads = [pack_signs(np.where(rng.random(D) < agreement, direction, -direction).astype(np.int8)) for _ in range(count)]
    return payloads, direction


def with_attackers(clients, fraction, attack, seed=0):
    payloads, direction = honest_payloads(clients, seed)
    attackers = list(range(int(fraction * clients)))
    attacked = attack_round(payloads, attackers, D, attack=attack, generator=torch.Generator().manual_seed(seed))
    return attacked, attackers, direction


def accuracy(vote, direction):
    return float((vote == direction).mean())


@pytest.mark.parametrize("clients", [10, 20])
@pytest.mark.parametrize("attack", ["all-ones", "sign-flip", "inverse-majority", "stealthy"])
def test_robust_vote_recovers_the_honest_direction_where_majority_fails(attack, clients):
    payloads, attackers, direction = with_attackers(clients, 0.3, attack)
    honest_only = majority_vote([p for i, p in enumerate(payloads) if i not in attackers], D)

    robust = robust_vote(payloads, D, generator=np.random.default_rng(1))
    plain = majority_vote(payloads, D)

    assert set(robust.dropped) == set(attackers), robust.dropped  # exactly the attackers, no honest client
    np.testing.assert_array_equal(robust.vote, honest_only)  # the vote the honest clients alone would have reached
    # Plain majority is moved off it on a large share of coordinates (measured 17-72% agreement at 30% attackers).
    # Agreement with the direction itself is the wrong yardstick here: all-ones moves every weak coordinate to +1,
    # which matches a random direction half the time, yet it drags the model one way every round.
    assert float((plain == honest_only).mean()) < 0.8


@pytest.mark.parametrize("clients", [10, 20])
def test_without_attackers_the_robust_vote_keeps_every_client_and_equals_majority(clients):
    payloads, _ = honest_payloads(clients, seed=3)
    robust = robust_vote(payloads, D, generator=np.random.default_rng(1))
    assert robust.dropped == {}
    np.testing.assert_array_equal(robust.vote, majority_vote(payloads, D))


def test_random_bits_are_noise_that_neither_rule_is_thrown_off_by():
    payloads, attackers, direction = with_attackers(10, 0.3, "random")
    robust = robust_vote(payloads, D, generator=np.random.default_rng(1))
    honest_only = majority_vote(payloads[3:], D)
    assert accuracy(robust.vote, direction) > accuracy(honest_only, direction) - 0.05


def test_a_majority_of_colluding_attackers_defeats_the_robust_vote_negative_control():
    # No rule beats an omniscient majority: with 60% inverse-majority attackers the "outliers" are the honest.
    payloads, attackers, direction = with_attackers(10, 0.6, "inverse-majority")
    robust = robust_vote(payloads, D, generator=np.random.default_rng(1))
    assert accuracy(robust.vote, direction) < 0.5


def test_the_robust_vote_reads_payloads_without_changing_them():
    payloads, _, _ = with_attackers(10, 0.3, "all-ones")
    before = [p.copy() for p in payloads]
    robust_vote(payloads, D)
    assert all(np.array_equal(a, b) for a, b in zip(payloads, before))


def test_the_mimic_attack_adapted_to_the_filters_is_not_caught_stated_limit():
    # docs/robustness.md states this limit: attackers that push only half of their pushed coordinates look honest
    # to every filter, so the robust vote falls back to plain majority (and costs nothing over it).
    payloads, _, _ = with_attackers(10, 0.3, "mimic")
    robust = robust_vote(payloads, D, generator=np.random.default_rng(1))
    assert robust.dropped == {}
    np.testing.assert_array_equal(robust.vote, majority_vote(payloads, D))


def test_the_attacks_send_what_they_say():
    from dpsign_fl.attacks import STEALTH_FRACTION
    from dpsign_fl.packing import unpack_signs

    payloads, direction = honest_payloads(10, seed=5)
    attackers = [0, 1, 2]
    honest_vote = majority_vote(payloads[3:], D)
    signs = {
        attack: [unpack_signs(p, D) for p in attack_round(payloads, attackers, D, attack=attack, generator=torch.Generator().manual_seed(0))]
        for attack in ("sign-flip", "all-ones", "inverse-majority", "stealthy", "mimic")
    }
    original = [unpack_signs(p, D) for p in payloads]
    assert all(np.array_equal(signs[a][3], original[3]) for a in signs)  # honest clients untouched
    np.testing.assert_array_equal(signs["sign-flip"][0], -original[0])
    assert (signs["all-ones"][1] == 1).all()
    decided = honest_vote != 0
    np.testing.assert_array_equal(signs["inverse-majority"][2][decided], -honest_vote[decided])
    changed = signs["stealthy"][0] != original[0]
    assert abs(changed.mean() - STEALTH_FRACTION / 2) < 0.01  # the pattern replaces a quarter; half already matched
    assert abs((signs["stealthy"][0] == 1).mean() - (original[0] == 1).mean()) < 0.01  # +1 rate kept
    together = (signs["stealthy"][0] == signs["stealthy"][1]).mean()  # same pattern on the pushed quarter
    expected = (1 - STEALTH_FRACTION) * (original[0] == original[1]).mean() + STEALTH_FRACTION
    assert abs(together - expected) < 0.01
    assert abs((signs["mimic"][0] != original[0]).mean() - STEALTH_FRACTION / 4) < 0.01


def brute_force_fewest_differences(sketch):
    """Each row's fewest differing bits with any other row: the n x n comparison the filter avoids."""
    differences = np.array([[int(np.bitwise_count(a ^ b).sum()) for b in sketch] for a in sketch])
    np.fill_diagonal(differences, np.iinfo(np.int64).max)
    return differences.min(axis=1)


@pytest.mark.parametrize("count", [3, 4, 5, 20, 64, 65])
def test_the_collusion_filter_compares_every_pair_of_up_to_65_payloads(count):
    from dpsign_fl.vote import _fewest_differences

    sketch = np.random.default_rng(count).integers(0, 256, (count, 37), dtype=np.uint8)
    found = _fewest_differences(sketch, np.random.default_rng(0))
    np.testing.assert_array_equal(found, brute_force_fewest_differences(sketch))


def test_beyond_65_payloads_each_is_compared_with_64_others_and_never_finds_a_closer_one_than_exists():
    from dpsign_fl.vote import COLLUSION_PARTNERS, _fewest_differences

    count = 300
    sketch = np.random.default_rng(0).integers(0, 256, (count, 64), dtype=np.uint8)
    sketch[17] = sketch[203]  # one identical pair
    found = _fewest_differences(sketch, np.random.default_rng(1))
    assert (found >= brute_force_fewest_differences(sketch)).all()
    # With 2 * 32 partners out of 299, an identical pair meets with probability 64/299 per draw: it must meet
    # in some of 40 fresh draws (and miss in others: each payload is compared with a sample, not all).
    met = [_fewest_differences(sketch, np.random.default_rng(seed))[17] == 0 for seed in range(40)]
    assert 0 < sum(met) < 40 and 2 * COLLUSION_PARTNERS == 64


def test_the_robust_vote_never_holds_an_m_by_m_matrix():
    # 2,000 payloads of 32,768 coordinates: an M x M float64 agreement matrix alone would be 32 MB.
    import tracemalloc

    count, d = 2_000, 32_768
    rng = np.random.default_rng(0)
    payloads = [rng.integers(0, 256, d // 8, dtype=np.uint8) for _ in range(count)]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        robust = robust_vote(payloads, d, generator=np.random.default_rng(1))
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert robust.dropped == {}
    assert peak < 8 * 2**20, peak  # measured 4.4 MiB: sketches (1 MiB), counters, the vote


BIG_D = 2_000_003  # beyond INSPECTED_BYTES: the +1 rate and disagreement filters read random blocks


@pytest.mark.parametrize("attack", ["all-ones", "inverse-majority", "stealthy", "sign-flip"])
def test_on_a_large_model_the_filters_read_a_sample_and_still_drop_exactly_the_attackers(attack):
    from dpsign_fl.vote import INSPECTED_BYTES

    assert BIG_D // 8 > 4 * INSPECTED_BYTES  # the filters read under a quarter of each payload
    rng = np.random.default_rng(7)
    direction = rng.choice(np.array([-1, 1], dtype=np.int8), size=BIG_D)
    agreement = rng.choice([0.5, 0.6, 0.9], p=[0.6, 0.3, 0.1], size=BIG_D)
    payloads = [pack_signs(np.where(rng.random(BIG_D) < agreement, direction, -direction).astype(np.int8)) for _ in range(10)]
    attackers = [0, 1, 2]
    attacked = attack_round(payloads, attackers, BIG_D, attack=attack, generator=torch.Generator().manual_seed(0))

    robust = robust_vote(attacked, BIG_D, generator=np.random.default_rng(1))

    assert set(robust.dropped) == set(attackers), robust.dropped
    np.testing.assert_array_equal(robust.vote, majority_vote(payloads[3:], BIG_D))
