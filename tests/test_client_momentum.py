"""Client momentum (run-config ``client-momentum``): the release is sign(beta * m + noisy sum), nothing else changes."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from dpsign_fl.models import build_model
from dpsign_fl.privacy import PrivacyLedger
from dpsign_fl.release import ClientMomentum, ReleaseSettings, client_release
from dpsign_fl.release.clipped_sum import clipped_gradient_sum
from dpsign_fl.release.mechanism import noisy_sum, poisson_sample
from dpsign_fl.rounds import Budget, ReleasePlan, SignedUpdate, client_round
from dpsign_fl.settings import ConfigError, RunSettings, from_mapping

SETTINGS = ReleaseSettings(sample_rate=0.5, clip_norm=1.0, noise_multiplier=0.3)


def setup():
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, seed=0)
    inputs, targets = torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))
    return model, inputs, targets


def reference_noisy_sum(model, inputs, targets, seed):
    """The noisy sum a release with this seed adds noise to, written out step by step."""
    generator = torch.Generator().manual_seed(seed)
    indices = poisson_sample(inputs.shape[0], SETTINGS.sample_rate, generator=generator)
    total = clipped_gradient_sum(model, F.cross_entropy, inputs[indices], targets[indices], clip_norm=SETTINGS.clip_norm)
    return noisy_sum(total, clip_norm=SETTINGS.clip_norm, noise_multiplier=SETTINGS.noise_multiplier, generator=generator)


def signs_of(values):
    return torch.where(values >= 0, 1, -1).to(torch.int8)


def move(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_the_reference_noisy_sum_is_the_plain_releases():
    model, inputs, targets = setup()
    plain = client_release(model, inputs, targets, SETTINGS, generator=torch.Generator().manual_seed(7))
    assert torch.equal(plain, signs_of(reference_noisy_sum(model, inputs, targets, 7)))


@pytest.mark.parametrize("beta", [0.5, 0.9])
def test_each_release_is_the_sign_of_the_beta_weighted_sum_of_the_clients_noisy_sums(beta):
    model, inputs, targets = setup()
    momentum = ClientMomentum(beta)
    expected, released = None, []
    for seed in (11, 12, 13):
        noisy = reference_noisy_sum(model, inputs, targets, seed)
        expected = noisy if expected is None else beta * expected + noisy
        signs = client_release(model, inputs, targets, SETTINGS, generator=torch.Generator().manual_seed(seed), momentum=momentum)
        assert torch.equal(signs, signs_of(expected))
        released.append((signs, signs_of(noisy)))
        move(model)
    first, first_plain = released[0]
    assert torch.equal(first, first_plain)  # nothing to add to before the first release
    # Negative control: later releases are not the plain release of that round.
    assert all((signs != plain).float().mean() > 0.01 for signs, plain in released[1:])


def test_a_state_of_another_length_is_dropped_and_the_sum_starts_again():
    momentum = ClientMomentum(0.9, np.ones(5, dtype=np.float32))
    noisy = torch.tensor([-0.5, 0.25, 2.0], dtype=torch.float64)
    assert torch.equal(momentum.add(noisy), noisy)
    np.testing.assert_array_equal(momentum.state, noisy.numpy())
    assert torch.equal(momentum.add(noisy), 1.9 * noisy)


def test_momentum_changes_nothing_in_the_ledger():
    model, inputs, targets = setup()
    plan = ReleasePlan(SETTINGS, 3, Budget(8.0, 1e-5))
    ledgers = []
    for momentum in (None, ClientMomentum(0.9)):
        ledger = PrivacyLedger(accountant="pld")
        for seed in (1, 2):
            outcome = client_round(model, inputs, targets, plan, ledger, generator=torch.Generator().manual_seed(seed), momentum=momentum)
            assert isinstance(outcome, SignedUpdate)
        ledgers.append(ledger)
    assert ledgers[0].to_dict() == ledgers[1].to_dict()


@pytest.mark.parametrize("beta", [1.0, -0.1, math.nan, math.inf, True, "0.5"])
def test_a_beta_outside_zero_one_is_refused(beta):
    with pytest.raises(ValueError, match="client-momentum"):
        ClientMomentum(beta)


@pytest.mark.parametrize("beta", [1.0, -0.1])
def test_the_run_config_key_is_range_checked_and_named(beta):
    with pytest.raises(ConfigError, match="client-momentum"):
        from_mapping(RunSettings, {"client-momentum": beta})
    assert from_mapping(RunSettings, {"client-momentum": 0.7}).client_momentum == 0.7
    assert RunSettings().client_momentum == 0.0
