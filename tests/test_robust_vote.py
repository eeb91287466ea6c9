"""The robust vote: it recovers the honest direction where plain majority does not, and costs nothing without attackers.

Synthetic sign vectors stand for DP-SIGN releases: every honest client sends
noisy signs around one common direction, with a signal that varies by
coordinate (most coordinates are close to coin flips under DP noise, some are
not), and attackers send what each attack sends (dpsign_fl.experiments.attacks).
"""

import numpy as np
import pytest
import torch

from dpsign_fl.experiments.attacks import attack_round
from dpsign_fl.vote.packing import pack_signs
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
    from dpsign_fl.experiments.attacks import STEALTH_FRACTION
    from dpsign_fl.vote.packing import unpack_signs

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
    """Each row's fewest differing bits with any other row, per block and over all: the n x n comparison the filter avoids."""
    per_block = np.array([[np.bitwise_count(a ^ b).sum(axis=1) for b in sketch] for a in sketch]).astype(np.int64)
    differences = np.concatenate([per_block, per_block.sum(axis=2, keepdims=True)], axis=2)
    for i in range(len(sketch)):
        differences[i, i] = np.iinfo(np.int64).max
    return differences.min(axis=1)


def random_sketch(count, seed, blocks=3, words=5):
    return np.random.default_rng(seed).integers(0, 2**63, (count, blocks, words), dtype=np.uint64)


@pytest.mark.parametrize("count", [3, 4, 5, 20, 64, 65])
def test_the_collusion_filter_compares_every_pair_of_up_to_65_payloads(count):
    from dpsign_fl.vote.robust import _fewest_differences

    sketch = random_sketch(count, seed=count)
    found = _fewest_differences(sketch, np.random.default_rng(0))
    np.testing.assert_array_equal(found, brute_force_fewest_differences(sketch))


def test_beyond_65_payloads_each_is_compared_with_64_others_and_never_finds_a_closer_one_than_exists():
    from dpsign_fl.vote.robust import COLLUSION_PARTNERS, _fewest_differences

    count = 300
    sketch = random_sketch(count, seed=0)
    sketch[17, 1] = sketch[203, 1]  # one pair identical on one block
    found = _fewest_differences(sketch, np.random.default_rng(1))
    assert (found >= brute_force_fewest_differences(sketch)).all()
    # With 2 * 32 partners out of 299, an identical pair meets with probability 64/299 per draw: it must meet
    # in some of 40 fresh draws (and miss in others: each payload is compared with a sample, not all).
    met = [_fewest_differences(sketch, np.random.default_rng(seed))[17, 1] == 0 for seed in range(40)]
    assert 0 < sum(met) < 40 and 2 * COLLUSION_PARTNERS == 64


def test_the_robust_vote_never_holds_an_m_by_m_matrix():
    # 4,000 payloads of 32,768 coordinates: an M x M float64 agreement matrix alone would be 128 MB.
    import tracemalloc

    count, d = 4_000, 32_768
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
    assert len(robust.dropped) < 5  # coin flips: the disagreement filter's 4-sigma tail, once in 4,000 here
    assert peak < 32 * 2**20, peak  # sketches: 7 blocks of 512 bytes per payload (14 MiB), counters, statistics


BIG_D = 2_000_003  # beyond INSPECTED_BYTES: the +1 rate and disagreement filters read random blocks


@pytest.mark.parametrize("attack", ["all-ones", "inverse-majority", "stealthy", "sign-flip"])
def test_on_a_large_model_the_filters_read_a_sample_and_still_drop_exactly_the_attackers(attack):
    from dpsign_fl.vote.robust import INSPECTED_BYTES

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


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


def test_the_targeted_push_sends_the_pushed_class_mean_input_signs_on_the_target_row_and_honest_signs_elsewhere():
    from dpsign_fl.experiments.attacks import targeted_push
    from dpsign_fl.vote.packing import unpack_signs
    from dpsign_fl.parameters import model_vector

    model = tiny_classifier()
    inputs, targets = torch.randn(60, 12), torch.arange(60) % 3
    push = targeted_push(model, inputs, targets, target_class=2, pushed_class=1)
    d = model_vector(model).shape[0]  # 12*4 + 4 + 4*3 + 3 = 67: the last layer's row 2 is 60..63, its bias 66
    hidden = torch.tanh(model[1](inputs[targets == 1]))
    np.testing.assert_array_equal(push.coordinates, [60, 61, 62, 63, 66])
    np.testing.assert_array_equal(push.signs, np.append(np.where(hidden.mean(0).detach().numpy() >= 0, 1, -1), 1))

    rng = np.random.default_rng(0)
    payloads = [pack_signs(rng.choice(np.array([-1, 1], dtype=np.int8), d)) for _ in range(5)]
    sent = attack_round(payloads, [0, 1], d, attack="targeted-push", generator=torch.Generator().manual_seed(0), push=push)
    for i in (0, 1):
        signs, honest = unpack_signs(sent[i], d), unpack_signs(payloads[i], d)
        np.testing.assert_array_equal(signs[push.coordinates], push.signs)
        others = np.setdiff1d(np.arange(d), push.coordinates)
        np.testing.assert_array_equal(signs[others], honest[others])
    assert sent[2] is payloads[2]


def test_the_adaptive_targeted_push_sends_honest_signs_on_its_random_share():
    from dpsign_fl.experiments.attacks import TargetedPush
    from dpsign_fl.vote.packing import unpack_signs

    coordinates = np.arange(0, D, 2)
    push = TargetedPush(coordinates, np.ones(coordinates.shape[0], dtype=np.int8), random_share=0.3)
    payloads, _ = honest_payloads(4, seed=2)
    sent = attack_round(payloads, [0], D, attack="targeted-push-adaptive", generator=torch.Generator().manual_seed(0), push=push)
    signs, honest = unpack_signs(sent[0], D)[coordinates], unpack_signs(payloads[0], D)[coordinates]
    pushed = signs == 1
    assert (signs[~pushed] == honest[~pushed]).all()
    # Where the honest sign is -1, +1 shows the push: kept on 70% of them.
    assert abs(pushed[honest == -1].mean() - 0.7) < 0.02


def noisy_payloads(count, seed):
    """Payloads as noisy as DP-SIGN releases of a small model (measured on MNIST: honest pairs agree on about 51%)."""
    rng = np.random.default_rng(seed)
    direction = rng.choice(np.array([-1, 1], dtype=np.int8), size=D)
    agreement = rng.choice([0.5, 0.6], p=[0.8, 0.2], size=D)
    payloads = [pack_signs(np.where(rng.random(D) < agreement, direction, -direction).astype(np.int8)) for _ in range(count)]
    return payloads, direction


def pushed_row(attack, share=0.5):
    """20 noisy clients, 4 attackers pushing a 3,970-coordinate row (a tenth of the model) against the honest direction."""
    from dpsign_fl.experiments.attacks import TargetedPush

    payloads, direction = noisy_payloads(20, seed=11)
    coordinates = np.arange(3_970, 7_940)
    push = TargetedPush(coordinates, -direction[coordinates], random_share=share)
    attacked = attack_round(payloads, [0, 1, 2, 3], D, attack=attack, generator=torch.Generator().manual_seed(0), push=push)
    return payloads, attacked, direction, coordinates


def test_a_targeted_push_on_one_block_is_dropped_as_collusion():
    payloads, attacked, direction, coordinates = pushed_row("targeted-push")

    robust = robust_vote(attacked, D, generator=np.random.default_rng(1))
    plain = majority_vote(attacked, D)

    assert robust.dropped == {i: "collusion" for i in range(4)}
    np.testing.assert_array_equal(robust.vote, majority_vote(payloads[4:], D))
    # Negative control: plain majority follows the push on much of the row.
    honest = majority_vote(payloads[4:], D)
    assert (plain[coordinates] == -direction[coordinates]).mean() > (honest[coordinates] == -direction[coordinates]).mean() + 0.1


def test_the_adaptive_targeted_push_on_half_of_its_row_is_not_caught_stated_limit():
    # docs/robustness.md states this limit: attackers that send their honest sign on half of the row look, block
    # by block, like honest clients that hold the same classes, which the filters must not drop.
    _, attacked, _, _ = pushed_row("targeted-push-adaptive", share=0.5)
    robust = robust_vote(attacked, D, generator=np.random.default_rng(1))
    assert robust.dropped == {}


def test_honest_clients_that_share_their_classes_are_not_dropped():
    # Pathological non-IID: each block (a class's row) has 2 holders whose signs follow a strong common signal
    # there (85% agreement with it each, so 75% with each other); elsewhere they are as noisy as the rest.
    rng = np.random.default_rng(4)
    direction = rng.choice(np.array([-1, 1], dtype=np.int8), size=D)
    clients, blocks = 20, 10
    signal = np.full((clients, D), 0.5)
    for client in range(clients):
        block = client // 2
        signal[client, block * 4_000 : (block + 1) * 4_000] = 0.85
    payloads = [pack_signs(np.where(rng.random(D) < signal[c], direction, -direction).astype(np.int8)) for c in range(clients)]
    assert clients // 2 == blocks

    robust = robust_vote(payloads, D, generator=np.random.default_rng(1))

    assert robust.dropped == {}


def test_the_sketch_comparison_alone_misses_the_targeted_push_negative_control():
    # The same 4 attackers against the pairwise comparison alone (512 random bytes compared as one sketch):
    # their extra agreement over the sketch (a tenth of it pushed) stays within the honest spread; the
    # likeness on the pushed block is what catches them.
    from dpsign_fl.experiments.attacks import TargetedPush
    from dpsign_fl.vote.robust import COLLUSION_MARGIN, _far_from_median

    payloads, direction = noisy_payloads(20, seed=11)
    coordinates = np.arange(3_970, 7_940)
    push = TargetedPush(coordinates, -direction[coordinates])
    attacked = attack_round(payloads, [0, 1, 2, 3], D, attack="targeted-push", generator=torch.Generator().manual_seed(0), push=push)
    positions = np.random.default_rng(1).choice(D // 8 - 1, size=512, replace=False)
    sketch = np.stack([p[positions] for p in attacked])
    differences = np.array([[int(np.bitwise_count(a ^ b).sum()) if i != j else 4096 for j, b in enumerate(sketch)] for i, a in enumerate(sketch)])
    closest = 1.0 - differences.min(axis=1) / 4096
    assert _far_from_median(closest, floor=0.5 / 64, threshold=COLLUSION_MARGIN, side="high") == []


@pytest.mark.parametrize("d", [D, BIG_D])
def test_inspecting_the_payloads_a_few_at_a_time_gives_the_same_statistics(d, monkeypatch):
    from dpsign_fl.vote import robust as vote

    rng = np.random.default_rng(3)
    rows = [rng.integers(0, 256, -(-d // 8), dtype=np.uint8) for _ in range(11)]
    counter = vote._counter(rows, range(11), d)
    blocks = vote._inspected_blocks(d, np.random.default_rng(0))
    together = vote._inspect(rows, list(range(11)), counter, blocks)
    monkeypatch.setattr(vote, "_INSPECTION_CHUNK_ROWS", 3)
    apart = vote._inspect(rows, list(range(11)), counter, blocks)
    for name in ("positives", "agreement", "decided", "likeness", "likeness_floor", "run_hashes"):
        np.testing.assert_array_equal(getattr(together, name), getattr(apart, name))


def test_copied_runs_count_the_64_byte_runs_a_payload_shares_exactly_with_another_at_the_same_place():
    from dpsign_fl.vote.robust import _block_and_counts, _copied_runs

    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 256, 512 * 3 + 5, dtype=np.uint8) for _ in range(6)]
    rows[1][64:192] = rows[0][64:192]  # runs 1 and 2
    rows[2][1536 - 64 : 1536] = rows[4][1536 - 64 : 1536]  # run 23, the last whole one
    rows[3][0:64] = rows[5][64:128]  # the same bits at another place: no copy
    rows[5][-5:] = rows[4][-5:]  # past the last whole block: not inspected
    _, hashes = _block_and_counts(rows, [None], np.arange(3))
    np.testing.assert_array_equal(_copied_runs(hashes), [2, 2, 1, 0, 1, 0])


def test_two_attackers_pushing_the_same_row_are_dropped_for_their_copies_though_each_statistic_of_pairs_misses_them():
    from dpsign_fl.vote import robust as vote
    from dpsign_fl.experiments.attacks import TargetedPush

    payloads, direction = noisy_payloads(20, seed=11)
    coordinates = np.arange(3_970, 7_940)
    push = TargetedPush(coordinates, -direction[coordinates])
    attacked = attack_round(payloads, [0, 1], D, attack="targeted-push", generator=torch.Generator().manual_seed(0), push=push)

    robust = robust_vote(attacked, D, generator=np.random.default_rng(1))

    assert robust.dropped == {0: "collusion", 1: "collusion"}
    # Negative control: the sketch and the likeness alone do not see two attackers among 20.
    everyone = list(range(20))
    seen = vote._inspect(attacked, everyone, vote._counter(attacked, everyone, D), None)
    assert vote._too_alike(seen) == set() and vote._colluders(attacked, everyone, np.random.default_rng(1)) == set()


def rounds_of_payloads(rounds, signal, seed):
    """``rounds`` rounds of payloads around one fixed direction: ``signal[client, coordinate]`` = P(sign = direction),
    the same every round (what a client's data make it push), with fresh noise every round (DP noise)."""
    rng = np.random.default_rng(seed)
    direction = rng.choice(np.array([-1, 1], dtype=np.int8), size=D)
    every = [[pack_signs(np.where(rng.random(D) < p, direction, -direction).astype(np.int8)) for p in signal] for _ in range(rounds)]
    return every, direction


def noisy_signal(clients):
    agreement = np.random.default_rng(99).choice([0.5, 0.6], p=[0.8, 0.2], size=D)
    return np.tile(agreement, (clients, 1))


def adaptive_push_rounds(rounds):
    """20 noisy clients; 0-3 push the same 3,970-coordinate row every round, sending their honest sign on a random half."""
    from dpsign_fl.experiments.attacks import TargetedPush

    every, direction = rounds_of_payloads(rounds, noisy_signal(20), seed=12)
    coordinates = np.arange(3_970, 7_940)
    push = TargetedPush(coordinates, -direction[coordinates], random_share=0.5)
    generator = torch.Generator().manual_seed(0)
    attacked = [attack_round(p, [0, 1, 2, 3], D, attack="targeted-push-adaptive", generator=generator, push=push) for p in every]
    return every, attacked


def test_an_adaptive_push_repeated_round_after_round_is_dropped_as_repetition():
    from dpsign_fl.vote import VoteMemory
    from dpsign_fl.vote.robust import REPETITION_HORIZON

    honest, attacked = adaptive_push_rounds(3 * REPETITION_HORIZON)
    memory = VoteMemory(np.random.default_rng(2))

    outcomes = [robust_vote(p, D, generator=np.random.default_rng(1), memory=memory, identities=list(range(20))) for p in attacked]

    assert all(set(o.dropped) <= {0, 1, 2, 3} for o in outcomes)  # never an honest client
    assert outcomes[0].dropped == {}  # the first round has nothing to compare with
    for outcome, payloads in zip(outcomes[2 * REPETITION_HORIZON :], honest[2 * REPETITION_HORIZON :]):
        assert outcome.dropped == {i: "repetition" for i in range(4)}
        np.testing.assert_array_equal(outcome.vote, majority_vote(payloads[4:], D))
    # Negative control: the stateless vote (no memory) keeps the attackers in every round.
    assert all(robust_vote(p, D, generator=np.random.default_rng(1)).dropped == {} for p in attacked[-5:])


def test_honest_payloads_with_fresh_noise_are_never_dropped_for_repetition():
    from dpsign_fl.vote import VoteMemory
    from dpsign_fl.vote.robust import REPETITION_HORIZON

    every, _ = rounds_of_payloads(3 * REPETITION_HORIZON, noisy_signal(20), seed=13)
    memory = VoteMemory(np.random.default_rng(2))

    dropped = [robust_vote(p, D, generator=np.random.default_rng(1), memory=memory, identities=list(range(20))).dropped for p in every]

    assert all(d == {} for d in dropped)


def test_non_iid_clients_that_repeat_their_own_classes_rows_against_the_others_are_not_dropped():
    # Pathological non-IID as the softmax gradient makes it: each block (a class's row) has 2 holders that push it
    # strongly the same way every round (85% agreement with their direction), and the 18 clients without the class
    # pull it weakly the other way (55%). The holders repeat themselves there far more than the others; the
    # others oppose them, so their likeness there is below the median and no round counts against them.
    from dpsign_fl.vote import VoteMemory
    from dpsign_fl.vote.robust import REPETITION_HORIZON

    clients = 20
    signal = np.full((clients, D), 0.5)
    for block in range(10):
        rows = slice(block * 4_000, (block + 1) * 4_000)
        signal[:, rows] = 0.45
        signal[2 * block : 2 * block + 2, rows] = 0.85
    every, _ = rounds_of_payloads(3 * REPETITION_HORIZON, signal, seed=14)
    memory = VoteMemory(np.random.default_rng(2))

    dropped = [robust_vote(p, D, generator=np.random.default_rng(1), memory=memory, identities=list(range(clients))).dropped for p in every]

    assert all(d == {} for d in dropped)


def test_the_memory_needs_one_distinct_identity_per_payload():
    from dpsign_fl.vote import VoteMemory

    payloads, _ = noisy_payloads(4, seed=1)
    for identities, message in ((None, "identities must be given"), ([0, 1, 2], "one per payload"), ([0, 1, 1, 2], "distinct")):
        with pytest.raises(ValueError, match=message):
            robust_vote(payloads, D, memory=VoteMemory(), identities=identities)


def test_the_memory_keeps_at_most_the_inspected_bytes_per_client():
    from dpsign_fl.vote import VoteMemory
    from dpsign_fl.vote.robust import INSPECTED_BYTES

    big_d = 8 * 4 * INSPECTED_BYTES
    rng = np.random.default_rng(3)
    payloads = [pack_signs(rng.choice(np.array([-1, 1], dtype=np.int8), size=big_d)) for _ in range(5)]
    memory = VoteMemory(np.random.default_rng(2))

    robust_vote(payloads, big_d, generator=np.random.default_rng(1), memory=memory, identities=["a", "b", "c", "d", "e"])

    assert len(memory) == 5
    assert 5 * INSPECTED_BYTES <= memory.nbytes <= 2 * 5 * INSPECTED_BYTES  # the table grows by doubling


def test_the_memory_keeps_what_each_client_sent_when_new_clients_make_it_grow():
    from dpsign_fl.vote import VoteMemory
    from dpsign_fl.vote.robust import INSPECTED_BYTES

    big_d = 8 * 4 * INSPECTED_BYTES
    rng = np.random.default_rng(4)
    first = [pack_signs(rng.choice(np.array([-1, 1], dtype=np.int8), size=big_d)) for _ in range(3)]
    memory = VoteMemory(np.random.default_rng(2))
    memory.remember(first, ["a", "b", "c"], big_d)
    newcomers = [pack_signs(rng.choice(np.array([-1, 1], dtype=np.int8), size=big_d)) for _ in range(7)]
    memory.remember(newcomers, list("defghij"), big_d)  # the table grows past its first 3 rows

    positions, agreement = memory.self_agreement(first + newcomers, list("abcdefghij"), big_d)
    assert positions == list(range(10))
    np.testing.assert_array_equal(agreement, np.ones_like(agreement))  # everyone's bits, as sent
    _, other = memory.self_agreement(newcomers[:3], ["a", "b", "c"], big_d)
    assert 0.4 < other.mean() < 0.6  # and not someone else's


@pytest.mark.parametrize("big", [False, True])
def test_the_memory_blocks_measured_in_the_inspection_pass_equal_inspecting_and_comparing_them_alone(big):
    # robust_vote reads the memory blocks in the same pass as its fresh inspected blocks, compares them with the
    # senders' last payloads and keeps them; that must equal an inspection of the memory blocks alone and the
    # memory's own comparison, and leave the other statistics unchanged.
    from dpsign_fl.vote import VoteMemory
    from dpsign_fl.vote.robust import INSPECTED_BYTES, _counter, _gather, _inspect, _inspected_blocks

    d = 8 * 4 * INSPECTED_BYTES + 11 if big else 8 * INSPECTED_BYTES // 2 + 11
    rng = np.random.default_rng(8)
    payload = lambda i: pack_signs(np.where(rng.random(d) < 0.5 + 0.05 * (i % 3), 1, -1).astype(np.int8))
    previous, rows = [payload(i) for i in range(6)], [payload(i) for i in range(9)]
    ids = list(range(9))
    counter = _counter(rows, ids, d)
    blocks = _inspected_blocks(d, np.random.default_rng(1))
    memory, reference = VoteMemory(np.random.default_rng(2)), VoteMemory(np.random.default_rng(2))
    for m in (memory, reference):
        m.remember(previous, ids[:6], d)  # 3 senders are new this round
    memory_blocks = memory.blocks(d)
    assert (blocks is not None) == big
    known, expected = reference.self_agreement(rows, ids, d)

    before, after = memory.slots(ids, d)
    folded = _inspect(rows, ids, counter, blocks, memory_blocks, (before, after))
    alone = _inspect(rows, ids, counter, blocks)
    memory_only = _inspect(rows, ids, counter, memory_blocks if big else None)

    for field in ("coordinates", "positives", "agreement", "decided", "likeness", "likeness_floor", "run_hashes"):
        np.testing.assert_array_equal(getattr(folded, field), getattr(alone, field), err_msg=field)
    np.testing.assert_allclose(folded.memory_likeness, memory_only.likeness[:, :-1], rtol=0, atol=1e-12)
    assert [p for p, row in enumerate(before) if row is not None] == known == list(range(6))
    np.testing.assert_array_equal(1.0 - folded.memory_differences[known] / (8 * 512), expected)
    np.testing.assert_array_equal(folded.memory_differences[6:], 0)
    np.testing.assert_array_equal(np.stack(after), np.stack([_gather(r, memory_blocks) for r in rows]))
    _, now = memory.self_agreement(rows, ids, d)  # what it keeps now is this round's payloads
    np.testing.assert_array_equal(now, np.ones_like(now))
