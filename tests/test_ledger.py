"""Tests of dpsign_fl.privacy.ledger: one client's record of its releases and its budget check."""

import dataclasses
import json
import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from dpsign_fl.privacy import PrivacyLedger, Release, compute_epsilon, epsilon_of_events

DELTA = 1e-5
ADD_OR_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
HETEROGENEOUS = [(0.02, 0.8, 50), (0.05, 1.2, 30), (0.02, 0.8, 20), (1.0, 6.0, 2)]


def reference_composed_epsilon(releases, accountant, discretization=1e-5):
    """dp-accounting directly: ComposedDpEvent of SelfComposed(PoissonSampled(Gaussian)) events."""
    events = []
    for sample_rate, noise_multiplier, count in releases:
        gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
        event = gaussian if sample_rate == 1 else dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)
        events.append(dp_accounting.SelfComposedDpEvent(event, count))
    if accountant == "pld":
        engine = pld.PLDAccountant(neighboring_relation=ADD_OR_REMOVE, value_discretization_interval=discretization)
    else:
        engine = rdp.RdpAccountant(orders=RDP_ORDERS, neighboring_relation=ADD_OR_REMOVE)
    engine.compose(dp_accounting.ComposedDpEvent(events))
    return engine.get_epsilon(DELTA)


def ledger_of(releases, accountant="pld"):
    ledger = PrivacyLedger(accountant=accountant)
    for sample_rate, noise_multiplier, count in releases:
        ledger.record(sample_rate=sample_rate, noise_multiplier=noise_multiplier, count=count)
    return ledger


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_ledger_of_identical_releases_equals_compute_epsilon(accountant):
    # Arrange: 120 releases one at a time.
    ledger = PrivacyLedger(accountant=accountant)
    for _ in range(120):
        ledger.record(sample_rate=0.02, noise_multiplier=0.797)
    # Act
    spent = ledger.epsilon(DELTA)
    # Assert
    expected = compute_epsilon(
        sample_rate=0.02, noise_multiplier=0.797, num_steps=120, target_delta=DELTA, accountant=accountant
    )
    assert spent == expected
    assert ledger.num_releases == 120
    assert ledger.releases == (Release(0.02, 0.797, 120),)  # run-length encoded


def test_ledger_of_heterogeneous_releases_equals_dp_accounting_rdp_of_the_composed_event():
    ledger = ledger_of(HETEROGENEOUS, "rdp")

    spent = ledger.epsilon(DELTA)

    assert spent == pytest.approx(reference_composed_epsilon(HETEROGENEOUS, "rdp"), rel=1e-12)
    assert ledger.num_releases == sum(count for _, _, count in HETEROGENEOUS)


def test_ledger_of_heterogeneous_releases_equals_the_accountant_on_the_same_history():
    # The 1e-5 reference bound of this history is tested in tests/test_accounting.py.
    ledger = ledger_of(HETEROGENEOUS)
    assert ledger.epsilon(DELTA) == epsilon_of_events(HETEROGENEOUS, target_delta=DELTA)


def test_heterogeneous_composition_is_told_apart_from_pretending_all_releases_were_the_first_kind():
    # Negative control for the equality test above: a ledger that merged every release into the
    # first kind, (0.02, 0.8) x 102, would be off by more than that test's tolerance.
    spent = ledger_of(HETEROGENEOUS).epsilon(DELTA)

    pretend = compute_epsilon(sample_rate=0.02, noise_multiplier=0.8, num_steps=102, target_delta=DELTA)

    assert abs(spent - pretend) > 1e-2 * spent


def test_would_exceed_flips_exactly_when_the_next_release_passes_the_target():
    # Arrange: the budget is exactly the epsilon of 40 releases.
    kwargs = dict(sample_rate=0.05, noise_multiplier=1.1)
    target = compute_epsilon(**kwargs, num_steps=40, target_delta=DELTA)
    ledger = ledger_of([(0.05, 1.1, 39)])
    # Act / Assert: the 40th release lands on the target (allowed), the 41st passes it (refused).
    assert not ledger.would_exceed(target, DELTA, **kwargs)
    ledger.record(**kwargs)
    assert ledger.epsilon(DELTA) == target
    assert ledger.would_exceed(target, DELTA, **kwargs)
    # Just below the 40th release's epsilon the 40th is refused too.
    assert ledger_of([(0.05, 1.1, 39)]).would_exceed(math.nextafter(target, 0), DELTA, **kwargs)


def test_epsilon_after_is_the_epsilon_of_one_more_release_and_does_not_record_it():
    ledger = ledger_of([(0.05, 1.1, 10)])

    after = ledger.epsilon_after(target_delta=DELTA, sample_rate=0.05, noise_multiplier=1.1)

    assert after == compute_epsilon(sample_rate=0.05, noise_multiplier=1.1, num_steps=11, target_delta=DELTA)
    assert ledger.num_releases == 10


def test_zero_noise_release_spends_infinite_epsilon_and_is_always_refused():
    ledger = ledger_of([(0.05, 1.1, 10)])

    assert ledger.would_exceed(1e6, DELTA, sample_rate=0.05, noise_multiplier=0.0)
    ledger.record(sample_rate=0.05, noise_multiplier=0.0)
    assert ledger.epsilon(DELTA) == math.inf


def test_empty_ledger_has_spent_nothing():
    assert PrivacyLedger().epsilon(DELTA) == 0.0
    assert PrivacyLedger().num_releases == 0


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_json_round_trip_keeps_history_accountant_and_epsilon(accountant):
    ledger = ledger_of([(0.05, 1.1, 10), (0.1, 2.0, 5)], accountant)

    restored = PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))

    assert restored.releases == ledger.releases
    assert restored.accountant == accountant
    assert restored.epsilon(DELTA) == ledger.epsilon(DELTA)


def test_releases_cannot_be_mutated_from_outside():
    ledger = ledger_of([(0.05, 1.1, 10), (0.1, 2.0, 5)])
    before = ledger.epsilon(DELTA)

    with pytest.raises(AttributeError):
        ledger.releases.append(Release(1.0, 0.1, 1000))  # a tuple
    with pytest.raises(AttributeError):
        ledger.releases = ()  # read-only property
    with pytest.raises(dataclasses.FrozenInstanceError):
        ledger.releases[0].count = 1
    exported = ledger.to_dict()
    exported["releases"].clear()
    history = [Release(0.1, 1.0, 5)]
    from_list = PrivacyLedger(history)
    history.append(Release(1.0, 0.1, 1000))

    assert ledger.epsilon(DELTA) == before
    assert from_list.num_releases == 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample_rate": 1.3, "noise_multiplier": 1.0}, r"sample_rate must be in \(0, 1\], got 1.3"),
        ({"sample_rate": 0.1, "noise_multiplier": -1.0}, r"noise_multiplier must be a finite number >= 0"),
        ({"sample_rate": 0.1, "noise_multiplier": 1.0, "count": 0}, r"count must be an integer >= 1, got 0"),
        ({"sample_rate": 0.1, "noise_multiplier": 1.0, "count": 1.5}, r"count must be an integer >= 1, got 1.5"),
        ({"sample_rate": 0.1, "noise_multiplier": 1.0, "count": True}, r"count must be an integer >= 1, got True"),
    ],
)
def test_bad_record_raises_naming_the_argument_and_leaves_the_ledger_unchanged(kwargs, message):
    ledger = ledger_of([(0.05, 1.1, 10)])

    with pytest.raises(ValueError, match=message):
        ledger.record(**kwargs)
    assert ledger.releases == (Release(0.05, 1.1, 10),)


@pytest.mark.parametrize(
    ("args", "message"),
    [((0.0, DELTA), r"target_epsilon must be a finite number > 0"), ((1.0, 1.0), r"target_delta must be in \(0, 1\)")],
)
def test_would_exceed_rejects_bad_budget(args, message):
    with pytest.raises(ValueError, match=message):
        PrivacyLedger().would_exceed(*args, sample_rate=0.1, noise_multiplier=1.0)


@pytest.mark.parametrize(
    "data",
    [
        {"version": 99, "accountant": "pld", "releases": []},
        {"accountant": "pld", "releases": []},
        {"version": 1, "accountant": "pld", "releases": [{"sample-rate": 0.1}]},
        {"version": 1, "accountant": "moments", "releases": []},
        {"version": 1, "accountant": "pld", "releases": [{"sample-rate": 0.1, "noise-multiplier": 1.0, "count": 0}]},
        [1, 2, 3],
    ],
)
def test_from_dict_rejects_what_is_not_a_ledger(data):
    with pytest.raises(ValueError):
        PrivacyLedger.from_dict(data)


def test_unknown_accountant_is_rejected():
    with pytest.raises(ValueError, match=r"accountant must be one of \('pld', 'rdp'\), got 'moments'"):
        PrivacyLedger(accountant="moments")
