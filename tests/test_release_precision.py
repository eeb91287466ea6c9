"""A release stays a Gaussian mechanism whatever the server sends: tiny or huge clip norms, huge model values.

The attack this guards against (found by an attack pass on an earlier version):
with ``clip-norm = 8e-46`` the noise scale ``sigma * C`` was applied in float32,
where it rounds to (almost) nothing, while one example's clipped gradient still
moved the sum by one float32 step; the released bit then told whether the
example was in the batch every time (30 of 30 releases with it, 0 of 30
without), while the ledger said epsilon 8.

Audit (as in tests/test_audit.py): worlds D0 = {} and D1 = {x0}, q = 1, one
release each time; the attacker reads one bit, the bias of class 1, and guesses
"D1" when it is -1. One release of SGM(q=1, sigma) with sensitivity C is
mu-GDP with mu = 1/sigma (Dong, Roth, Su 2019, arXiv:1905.02383, Thm 2.7); any
test on one coordinate is then bounded by the same mu, so

    mu_lb = Phi^{-1}(1 - FPR_upper) - Phi^{-1}(FNR_upper)

(95% Clopper-Pearson upper bounds) must not exceed 1/sigma. The model is a
Linear(1, 2) whose bias alone is trained and whose weights (+v, -v) the server
chose: at v = 1e6 the softmax saturates and x0's bias gradient is (1, -1),
clipped to norm C, so the read coordinate moves by C / sqrt(2): expected
mu = 0.707 / sigma, whatever C is, when the release is computed right.
"""

import math

import pytest
import torch
from scipy import stats
from torch import nn
from torch.nn import functional as F

from dpsign_fl.release.clipped_sum import clipped_gradient_sum
from dpsign_fl.release.mechanism import MAX_CLIP_NORM, MIN_CLIP_NORM, secure_generator, standard_normal, to_signs
from dpsign_fl.release import MAX_MODEL_MAGNITUDE, ReleaseSettings, UnsafeRelease, client_release
from dpsign_fl.settings import ConfigError, RunSettings

NUM_RELEASES = 1500
READ = 1  # the bias of class 1
X0, Y0 = torch.ones(1, 1), torch.tensor([1])


def hostile_model(value: float) -> nn.Module:
    model = nn.Linear(1, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[value], [-value]]))
        model.bias.zero_()
    model.weight.requires_grad_(False)
    return model


def float32_noise_release(model, inputs, targets, settings, *, generator):
    """The earlier release: the clipped sum plus noise drawn and scaled in the model's float32 (NOT private)."""
    total = clipped_gradient_sum(model, F.cross_entropy, inputs, targets, clip_norm=settings.clip_norm)
    noise = torch.randn(total.shape, generator=generator, dtype=total.dtype)
    return to_signs(total + noise * (settings.noise_multiplier * settings.clip_norm))


def clopper_pearson_upper(successes: int, trials: int) -> float:
    return stats.binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="exact").high


def audited_mu_lower_bound(release, model, settings) -> float:
    generator = secure_generator(7)
    with_x0 = [int(release(model, X0, Y0, settings, generator=generator)[READ]) for _ in range(NUM_RELEASES)]
    without = [int(release(model, X0[:0], Y0[:0], settings, generator=generator)[READ]) for _ in range(NUM_RELEASES)]
    false_positives, false_negatives = without.count(-1), with_x0.count(1)
    fpr_upper = clopper_pearson_upper(false_positives, NUM_RELEASES)
    fnr_upper = clopper_pearson_upper(false_negatives, NUM_RELEASES)
    return float(stats.norm.ppf(1.0 - fpr_upper) - stats.norm.ppf(fnr_upper))


@pytest.mark.parametrize(
    "clip_norm, model_value, noise_multiplier",
    [
        (MIN_CLIP_NORM, MAX_MODEL_MAGNITUDE, 0.41),
        (MIN_CLIP_NORM, MAX_MODEL_MAGNITUDE, 1.0),
        (1.0, 0.0, 1.0),
        (MAX_CLIP_NORM, MAX_MODEL_MAGNITUDE, 1.0),
    ],
)
def test_no_clip_norm_or_model_value_the_server_may_send_gives_a_distinguisher_beyond_one_over_sigma(
    clip_norm, model_value, noise_multiplier
):
    settings = ReleaseSettings(sample_rate=1.0, clip_norm=clip_norm, noise_multiplier=noise_multiplier)

    mu_lower_bound = audited_mu_lower_bound(client_release, hostile_model(model_value), settings)

    assert mu_lower_bound <= 1.0 / noise_multiplier
    if clip_norm < 1.0:
        # Not vacuous: the read coordinate moves by C / sqrt(2), and the audit sees most of it (true mu 0.707 / sigma).
        assert mu_lower_bound > 0.5 / noise_multiplier


def test_audit_flags_the_float32_noise_of_a_clip_norm_below_the_floor_negative_control():
    # The attack as found: C = 8e-46, sigma 0.41, v = 1e6: every release with x0 reads -1, none without.
    settings = ReleaseSettings(sample_rate=1.0, clip_norm=1.0, noise_multiplier=0.41)
    object.__setattr__(settings, "clip_norm", 8e-46)  # past the validation the real release path has

    mu_lower_bound = audited_mu_lower_bound(float32_noise_release, hostile_model(1e6), settings)

    assert mu_lower_bound > 2.0 / 0.41


@pytest.mark.parametrize("clip_norm", [8e-46, MIN_CLIP_NORM / 2, MAX_CLIP_NORM * 2, float("nan"), float("inf")])
def test_a_clip_norm_outside_the_release_range_is_refused_by_the_release_and_by_the_run_config(clip_norm):
    with pytest.raises(ValueError, match="clip_norm must be in"):
        ReleaseSettings(sample_rate=0.5, clip_norm=clip_norm, noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="clip_norm"):
        RunSettings(clip_norm=clip_norm)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), MAX_MODEL_MAGNITUDE * 10])
def test_a_model_with_a_non_finite_or_huge_entry_is_refused_before_any_example_is_sampled(value):
    model = hostile_model(0.0)
    with torch.no_grad():
        model.bias[0] = value
    generator = secure_generator(3)
    state = generator.get_state()

    with pytest.raises(UnsafeRelease, match="bias"):
        client_release(model, X0, Y0, ReleaseSettings(1.0, 1.0, 1.0), generator=generator)
    assert torch.equal(generator.get_state(), state)  # nothing was drawn: no sampling, no noise


def test_the_noise_is_added_in_float64_so_its_scale_never_rounds_away():
    # sigma * C = 1e-5 * 1e-5 = 1e-10 on a float32 sum of 1.0: in float32 the noise would vanish (eps 1.2e-7).
    from dpsign_fl.release.mechanism import noisy_sum

    noisy = noisy_sum(torch.ones(10_000), clip_norm=1e-5, noise_multiplier=1e-5, generator=secure_generator(4))

    assert noisy.dtype == torch.float64
    assert float((noisy - 1.0).std()) == pytest.approx(1e-10, rel=0.05)


@pytest.mark.parametrize("count", [0, 1, 15, 16, 17, 33, 4_000, 136_545])
def test_the_noise_sampler_draws_what_torch_randn_draws_in_float64_and_leaves_the_generator_where_it_would(count):
    # Seeded runs made before the vectorised sampler give the same releases: same uniforms, same transform.
    expected_generator, generator = torch.Generator().manual_seed(count), torch.Generator().manual_seed(count)
    expected = torch.randn(count, generator=expected_generator, dtype=torch.float64)

    drawn = standard_normal(count, generator=generator)

    assert drawn.dtype == torch.float64 and drawn.shape == (count,)
    assert torch.allclose(drawn, expected, rtol=0, atol=1e-13)
    assert torch.equal(generator.get_state(), expected_generator.get_state())


def test_the_noise_sampler_is_standard_normal_and_a_wrong_transform_is_caught_negative_control():
    drawn = standard_normal(200_000, generator=torch.Generator().manual_seed(3)).numpy()
    assert stats.kstest(drawn, "norm").pvalue > 1e-3
    # Negative control: the radius without the factor 2 (sqrt(-log(1 - u))) is N(0, 1/2).
    assert stats.kstest(drawn / 2**0.5, "norm").pvalue < 1e-6
    assert abs(drawn).max() <= (106 * math.log(2)) ** 0.5  # 1 - u >= 2^-53
