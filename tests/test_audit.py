"""Empirical privacy audit of ONE DP-SIGN release (q = 1), with a clip-the-mean negative control.

Worlds: D0 = {x0}, D1 = {x0, canary}, with per-example gradients x0 = +G and
canary = -3G in d = 1 (G = 100 C >> C), so the canary's whole effect falls on
the one released coordinate. The attacker sees the released bit and guesses
"D1" when it is -1.

One release of SGM(q=1, sigma) with sensitivity C is exactly mu-GDP with
mu = 1/sigma (Dong, Roth, Su 2019, "Gaussian Differential Privacy",
arXiv:1905.02383, Thm 2.7). Every test of a mu-GDP mechanism then satisfies
FNR >= Phi(Phi^{-1}(1 - FPR) - mu), so

    mu_lb = Phi^{-1}(1 - FPR_upper) - Phi^{-1}(FNR_upper)

with 95% Clopper-Pearson upper bounds on both error rates is a lower bound on
the mechanism's mu (at 95% confidence per rate). It must not exceed 1/sigma
for dp_sign; for the clip-the-mean mechanism (sensitivity 2C, true mu = 2/sigma)
the same audit must find mu_lb > 1/sigma.

Expected rates (sigma = 1): dp_sign: FPR = Phi(-1) = 0.159, FNR = 1/2, so the
test sits exactly on the GDP curve (point estimate mu = 1/sigma; the bound falls
below it by the confidence margins). Clip-the-mean: FPR = FNR = Phi(-1), so mu = 2.
"""

import torch
from scipy import stats

from dpsign_fl.release.mechanism import clip_per_sample, dp_sign, secure_generator

CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.0
NUM_RELEASES = 5000
BIG = 100.0 * CLIP_NORM


def clip_mean_sign(per_sample_grads, *, clip_norm, noise_multiplier, generator):
    """The source paper's Algorithm 2: sign(clip(mean) + N(0, (sigma C)^2)). Sensitivity 2C: NOT 1/sigma-GDP."""
    clipped = clip_per_sample(per_sample_grads.mean(dim=0, keepdim=True), clip_norm=clip_norm)[0]
    noise = torch.randn(clipped.shape, generator=generator, dtype=clipped.dtype)
    return torch.where(clipped + noise * noise_multiplier * clip_norm >= 0, 1, -1).to(torch.int8)


def released_bits(release, world, seed):
    generator = secure_generator(seed)
    return torch.cat(
        [
            release(world, clip_norm=CLIP_NORM, noise_multiplier=NOISE_MULTIPLIER, generator=generator)
            for _ in range(NUM_RELEASES)
        ]
    )


def clopper_pearson_upper(successes: int, trials: int) -> float:
    return stats.binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="exact").high


def audited_mu_lower_bound(release) -> float:
    """Run NUM_RELEASES releases in each world and return mu_lb of the threshold test 'bit = -1 => D1'."""
    world0 = torch.tensor([[BIG]], dtype=torch.float64)
    world1 = torch.tensor([[BIG], [-3.0 * BIG]], dtype=torch.float64)
    bits0 = released_bits(release, world0, seed=101)
    bits1 = released_bits(release, world1, seed=202)
    false_positives = int((bits0 == -1).sum())  # guessed D1 in D0
    false_negatives = int((bits1 == 1).sum())  # guessed D0 in D1
    fpr_upper = clopper_pearson_upper(false_positives, NUM_RELEASES)
    fnr_upper = clopper_pearson_upper(false_negatives, NUM_RELEASES)
    return float(stats.norm.ppf(1.0 - fpr_upper) - stats.norm.ppf(fnr_upper))


def test_audited_mu_of_one_dp_sign_release_does_not_exceed_one_over_sigma():
    mu_lower_bound = audited_mu_lower_bound(dp_sign)

    assert mu_lower_bound <= 1.0 / NOISE_MULTIPLIER
    # The audit is tight, not vacuous: it finds most of the true mu = 1.
    assert mu_lower_bound > 0.8 / NOISE_MULTIPLIER


def test_audit_flags_clip_the_mean_as_exceeding_one_over_sigma():
    # Negative control: true mu = 2 / sigma; with 5000 releases per world mu_lb is ~1.9.
    mu_lower_bound = audited_mu_lower_bound(clip_mean_sign)

    assert mu_lower_bound > 1.0 / NOISE_MULTIPLIER
    assert mu_lower_bound > 1.5 / NOISE_MULTIPLIER
