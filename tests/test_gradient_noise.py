"""Tests of dpsign_fl.gradient_noise: distributions (with negative controls), tails, arguments.

References: scipy.stats.norm and scipy.stats.levy_stable CDFs (the stable CDF
is computed by numerical integration, independently of the sampler).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from dpsign_fl.experiments.gradient_noise import GRADIENT_NOISES, add_gradient_noise

SCALE = 0.25
ALPHA = 1.6


def _noise(kind, size, *, seed=0, scale=SCALE, alpha=ALPHA, dtype=torch.float64):
    zeros = torch.zeros(size, dtype=dtype)
    return add_gradient_noise(zeros, kind=kind, scale=scale, alpha=alpha, generator=np.random.default_rng(seed)).numpy()


def test_none_returns_the_gradients_unchanged():
    gradients = torch.randn(10)

    assert add_gradient_noise(gradients, kind="none", generator=None) is gradients


def test_gaussian_noise_has_std_scale_and_fails_at_two_thirds_and_three_halves_of_it():
    draws = _noise("gaussian", 20_000)

    assert stats.kstest(draws, stats.norm(scale=SCALE).cdf).pvalue > 0.01
    for wrong in (2 / 3 * SCALE, 3 / 2 * SCALE):  # negative controls
        assert stats.kstest(draws, stats.norm(scale=wrong).cdf).pvalue < 1e-6
    assert np.std(draws) == pytest.approx(SCALE, rel=0.02)


def test_levy_noise_matches_scipys_stable_cdf_and_not_a_wrong_scale():
    draws = _noise("levy", 2_000, seed=1)

    assert stats.kstest(draws, stats.levy_stable(ALPHA, 0.0, scale=SCALE).cdf).pvalue > 0.01
    for wrong in (2 / 3 * SCALE, 3 / 2 * SCALE):  # negative controls
        assert stats.kstest(draws, stats.levy_stable(ALPHA, 0.0, scale=wrong).cdf).pvalue < 1e-6


def test_levy_noise_has_the_tail_mass_of_alpha_1_6_where_gaussian_noise_has_none():
    levy = _noise("levy", 100_000, seed=2)
    gaussian = _noise("gaussian", 100_000, seed=2)
    beyond = np.sum(np.abs(levy) > 20 * SCALE)

    def expected(alpha):  # P(|X| > 20 scale) for S(alpha, 0, scale), times the draws
        return 2 * stats.levy_stable.sf(20.0, alpha, 0.0) * levy.shape[0]

    # expected(1.6) = 282 (binomial sd 17); negative controls: alpha 1.5 gives 454, alpha 1.7 gives 164.
    assert abs(beyond - expected(ALPHA)) < 5 * np.sqrt(expected(ALPHA))
    assert abs(beyond - expected(1.5)) > 5 * np.sqrt(expected(1.5))
    assert abs(beyond - expected(1.7)) > 5 * np.sqrt(expected(1.7))
    assert np.sum(np.abs(gaussian) > 20 * SCALE) == 0
    assert stats.kurtosis(levy) > 100 > abs(stats.kurtosis(gaussian))


@pytest.mark.parametrize("kind", ["gaussian", "levy"])
def test_noise_keeps_shape_dtype_and_adds_to_the_input(kind):
    gradients = torch.full((3, 4, 5), 7.0, dtype=torch.float32)

    noisy = add_gradient_noise(gradients, kind=kind, generator=np.random.default_rng(0))

    assert noisy.shape == gradients.shape and noisy.dtype == torch.float32
    assert torch.all(gradients == 7.0)  # the input is not modified
    assert not torch.equal(noisy, gradients)


@pytest.mark.parametrize("kind", ["gaussian", "levy"])
def test_same_seed_gives_the_same_noise_for_numpy_and_torch_generators(kind):
    gradients = torch.zeros(50, dtype=torch.float64)

    numpy_draws = [
        add_gradient_noise(gradients, kind=kind, generator=np.random.default_rng(4)) for _ in range(2)
    ]
    torch_draws = [
        add_gradient_noise(gradients, kind=kind, generator=torch.Generator().manual_seed(4)) for _ in range(2)
    ]

    assert torch.equal(*numpy_draws) and torch.equal(*torch_draws)
    assert not torch.equal(add_gradient_noise(gradients, kind=kind, generator=None), numpy_draws[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "cauchy"}, "kind must be one of"),
        ({"kind": "gaussian", "scale": 0.0}, "scale must be a finite number > 0"),
        ({"kind": "levy", "scale": -1.0}, "scale must be a finite number > 0"),
        ({"kind": "levy", "alpha": 2.5}, r"alpha must be in \(0, 2\]"),
        ({"kind": "levy", "alpha": 0.0}, r"alpha must be in \(0, 2\]"),
    ],
)
def test_bad_noise_arguments_raise_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        add_gradient_noise(torch.zeros(3), generator=None, **kwargs)


def test_integer_gradients_and_unknown_generators_are_type_errors():
    with pytest.raises(TypeError, match="floating-point"):
        add_gradient_noise(torch.zeros(3, dtype=torch.int64), kind="gaussian", generator=None)
    with pytest.raises(TypeError, match="generator must be"):
        add_gradient_noise(torch.zeros(3), kind="gaussian", generator=42)


def test_noise_kinds_are_the_documented_three():
    assert GRADIENT_NOISES == ("none", "gaussian", "levy")
