"""Tests of dpsign_fl.experiments.compressors and dpsign_fl.experiments.jin: the baselines DP-SIGN is compared with."""

import math

import pytest
import torch

from dpsign_fl.experiments.compressors import jin_dp_sign, sign, sto_sign
from dpsign_fl.experiments.jin import jin_noise_multiplier, jin_true_epsilon
from dpsign_fl.release.mechanism import dp_sign, secure_generator
from dpsign_fl.privacy import calibrate_noise_multiplier, compute_epsilon

BOUND = 2.0
# Gradient values in [-b, b], each repeated 4000 times: one call draws 4000 independent sto-signs per value.
VALUES = torch.tensor([-2.0, -1.5, -0.7, -0.1, 0.0, 0.05, 0.6, 1.9, 2.0], dtype=torch.float64)
DRAWS = 4000


def z_scores_of_mean(scaled_signs: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """z of the mean of b * s per value, against its expectation, with the exact variance b^2 - g^2."""
    means = scaled_signs.reshape(len(VALUES), DRAWS).mean(dim=1)
    std_errors = torch.sqrt(torch.clamp(BOUND**2 - VALUES**2, min=0.0) / DRAWS)
    return (means - expected) / torch.where(std_errors > 0, std_errors, torch.ones_like(std_errors))


def test_sto_sign_times_bound_is_unbiased_for_the_gradient():
    # Arrange
    gradient = VALUES.repeat_interleave(DRAWS)
    # Act
    scaled = sto_sign(gradient, bound=BOUND, generator=secure_generator(31)).to(torch.float64) * BOUND
    # Assert: |z| < 4 for each of 9 values (two-sided p ~ 6e-5 each); +-b are deterministic (z = 0 exactly).
    z = z_scores_of_mean(scaled, VALUES)
    assert torch.all(z.abs() < 4.0), z
    # Negative control: plain sign(g) * b is biased and the same z-test rejects it.
    biased = sign(gradient).to(torch.float64) * BOUND
    assert torch.any(z_scores_of_mean(biased, VALUES).abs() > 10.0)


def test_sto_sign_clamps_entries_beyond_the_bound_to_a_deterministic_sign():
    gradient = torch.tensor([5.0, -7.0, 1e9, -1e9]).repeat(100)

    signs = sto_sign(gradient, bound=1.0, generator=secure_generator(32))

    assert torch.equal(signs, torch.tensor([1, -1, 1, -1], dtype=torch.int8).repeat(100))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_sto_sign_rejects_a_non_positive_bound(bad):
    with pytest.raises(ValueError, match="bound must be > 0"):
        sto_sign(torch.zeros(3), bound=bad)


def test_sto_sign_is_reproducible_with_a_seed():
    gradient = torch.linspace(-1, 1, 200)

    first = sto_sign(gradient, bound=1.0, generator=secure_generator(33))
    again = sto_sign(gradient, bound=1.0, generator=secure_generator(33))

    assert torch.equal(first, again)


def test_sign_maps_zero_to_plus_one_as_int8():
    signs = sign(torch.tensor([-3.0, 0.0, 2.5, -0.0]))

    assert signs.dtype == torch.int8
    assert torch.equal(signs, torch.tensor([-1, 1, 1, 1], dtype=torch.int8))


def test_jin_noise_multiplier_is_the_classical_gaussian_mechanism_formula():
    # Golden value by hand: sqrt(2 ln(1.25 / 1e-5)) / 1 = sqrt(2 * 11.7361) = 4.844805 (Dwork & Roth 2014, Thm A.1).
    sigma = jin_noise_multiplier(epsilon_per_step=1.0, delta_per_step=1e-5)
    assert sigma == pytest.approx(4.844805262605389, rel=1e-12)
    assert jin_noise_multiplier(epsilon_per_step=0.25, delta_per_step=1e-3) == pytest.approx(
        math.sqrt(2 * math.log(1250.0)) / 0.25, rel=1e-12
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon_per_step": 0.0, "delta_per_step": 1e-5}, r"epsilon_per_step must be a finite number > 0"),
        ({"epsilon_per_step": 1.0, "delta_per_step": 1.0}, r"delta_per_step must be in \(0, 1\)"),
    ],
)
def test_jin_noise_multiplier_rejects_bad_arguments_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jin_noise_multiplier(**kwargs)


def test_jin_per_step_guarantee_is_far_from_the_guarantee_over_training():
    # Jin et al.'s dp-sign at per-step (1, 1e-5), full local batch (q = 1), T = 1000 steps, delta = 1e-5.
    # Measured (PLD): 48.37; equivalently mu-GDP with mu = sqrt(1000) / 4.8448 = 6.53.
    true_epsilon = jin_true_epsilon(
        epsilon_per_step=1.0, delta_per_step=1e-5, sample_rate=1.0, num_steps=1000, target_delta=1e-5
    )

    assert true_epsilon > 40 * 1.0
    assert true_epsilon == pytest.approx(48.37, rel=1e-3)
    assert true_epsilon == compute_epsilon(
        sample_rate=1.0, noise_multiplier=4.844805262605389, num_steps=1000, target_delta=1e-5
    )


def test_rectified_jin_calibration_is_private_but_needs_far_more_noise_than_composition():
    # Per-step (eps / T, delta / T) is (eps, delta)-DP by basic composition; PLD confirms it is
    # (far) within budget, and shows the noise is ~50x what a composed calibration needs.
    num_steps, epsilon, delta = 1000, 1.0, 1e-5
    rectified_sigma = jin_noise_multiplier(epsilon_per_step=epsilon / num_steps, delta_per_step=delta / num_steps)
    rectified_epsilon = jin_true_epsilon(
        epsilon_per_step=epsilon / num_steps,
        delta_per_step=delta / num_steps,
        sample_rate=1.0,
        num_steps=num_steps,
        target_delta=delta,
    )
    composed_sigma = calibrate_noise_multiplier(
        target_epsilon=epsilon, target_delta=delta, sample_rate=1.0, num_steps=num_steps
    )

    assert rectified_epsilon <= epsilon
    # Measured: rectified sigma 6106.4, composed (PLD) sigma 117.97.
    assert rectified_sigma > 50 * composed_sigma


def test_jin_dp_sign_is_dp_sign_at_jin_noise_multiplier():
    grads = torch.randn(7, 300, generator=torch.Generator().manual_seed(34))

    jin = jin_dp_sign(grads, clip_norm=1.0, epsilon_per_step=0.5, delta_per_step=1e-5, generator=secure_generator(35))
    ours = dp_sign(
        grads,
        clip_norm=1.0,
        noise_multiplier=jin_noise_multiplier(epsilon_per_step=0.5, delta_per_step=1e-5),
        generator=secure_generator(35),
    )

    assert torch.equal(jin, ours)
