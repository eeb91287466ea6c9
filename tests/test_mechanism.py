"""Tests of dpsign_fl.release.mechanism: sampling, per-sample gradients, clipping, noise, sign.

Statistical tests use fixed seeds and each comes with a negative control that
must fail (a wrong noise scale, a clip-the-mean or clip-per-tensor mechanism),
so a test that cannot fail is caught.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats
from torch import nn

from dpsign_fl.release.mechanism import (
    AUTOMATIC_CLIPPING_GAMMA,
    clip_per_sample,
    dp_sign,
    noisy_clipped_sum,
    per_sample_gradients,
    poisson_sample,
    secure_generator,
)

# ---------------------------------------------------------------- helpers


def small_cnn() -> nn.Module:
    """Conv + GroupNorm + linear: the shape of model DP training uses (no BatchNorm)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, kernel_size=3),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    ).double()


def cnn_batch(batch_size: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, 1, 8, 8, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 3, (batch_size,), generator=generator)
    return inputs, targets


def one_at_a_time_gradients(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Reference: one backward pass per example, trainable parameters in parameters() order."""
    rows = []
    for i in range(inputs.shape[0]):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs[i : i + 1]), targets[i : i + 1])
        loss.backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]))
    model.zero_grad()
    return torch.stack(rows)


def clip_mean_then_noise(per_sample_grads, *, clip_norm, noise_multiplier, generator=None):
    """The source paper's Algorithm 2 (NOT private at sigma): clip the batch MEAN to C, add N(0, (sigma C)^2).

    Its add/remove sensitivity is 2C; used here only as a negative control.
    """
    mean = per_sample_grads.mean(dim=0, keepdim=True)
    clipped = clip_per_sample(mean, clip_norm=clip_norm)[0]
    if noise_multiplier == 0:
        return clipped
    noise = torch.randn(clipped.shape, generator=generator, dtype=clipped.dtype)
    return clipped + noise * noise_multiplier * clip_norm


def clip_each_tensor_then_sum(per_sample_grads, *, clip_norm, num_tensors):
    """Clip each of ``num_tensors`` equal slices of every row to C separately (NOT sensitivity C)."""
    slices = per_sample_grads.chunk(num_tensors, dim=1)
    return torch.cat([clip_per_sample(s, clip_norm=clip_norm) for s in slices], dim=1).sum(dim=0)


def pre_noise_sum(per_sample_grads, clip_norm, clipping="flat"):
    return noisy_clipped_sum(per_sample_grads, clip_norm=clip_norm, noise_multiplier=0.0, clipping=clipping)


# ---------------------------------------------------------------- Poisson sampling


def test_poisson_sample_size_is_binomial_n_q():
    # 200 draws of n=1000 at q=0.05: total sampled ~ Binomial(200 000, 0.05).
    generator = secure_generator(11)
    sizes = [len(poisson_sample(1000, 0.05, generator=generator)) for _ in range(200)]

    right = stats.binomtest(sum(sizes), 200 * 1000, 0.05).pvalue
    wrong = stats.binomtest(sum(sizes), 200 * 1000, 0.055).pvalue  # negative control: q off by 10%

    assert right > 1e-3
    assert wrong < 1e-6


def _inclusions(sampler, sample_rate, draws, *, seed, chunk=2**24):
    generator = torch.Generator().manual_seed(seed)
    total = 0
    for start in range(0, draws, chunk):
        total += int(sampler(min(chunk, draws - start), sample_rate, generator))
    return total


def _exact(count, sample_rate, generator):
    return poisson_sample(count, sample_rate, generator=generator).numel()


def _float32(count, sample_rate, generator):
    # The earlier sampler: float32 uniforms are multiples of 2^-24, so P(u < q) is q rounded up to that grid.
    return int((torch.rand(count, generator=generator) < sample_rate).sum())


@pytest.mark.parametrize(("sample_rate", "draws"), [(2.0**-30, 2**29), (0.05, 20_000_000)])
def test_poisson_inclusion_rate_is_exactly_the_sample_rate_binomial_test(sample_rate, draws):
    # H0: the count is Binomial(draws, q). At q = 2^-30 the mean is 0.5 (a float32 sampler's is 32).
    count = _inclusions(_exact, sample_rate, draws, seed=11)
    assert stats.binomtest(count, draws, sample_rate).pvalue > 1e-4, count


def test_float32_sampling_fails_the_same_binomial_test_at_q_2_pow_minus_30_negative_control():
    count = _inclusions(_float32, 2.0**-30, 2**29, seed=11)
    assert stats.binomtest(count, 2**29, 2.0**-30).pvalue < 1e-6, count


def test_bernoulli_mask_draws_53_bit_uniforms_the_exactness_argument_relies_on():
    draws = torch.rand(1_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2.0**53
    assert torch.equal(draws, draws.floor()) and bool((draws < 2.0**53).all())
    assert 0.49 < float((torch.fmod(draws, 2) == 1).double().mean()) < 0.51  # the lowest bit is used


def test_poisson_sample_returns_sorted_unique_indices_and_all_at_q_one():
    generator = secure_generator(12)

    indices = poisson_sample(500, 0.3, generator=generator)

    assert indices.dtype == torch.long
    assert torch.all(indices[1:] > indices[:-1])
    assert int(indices.min()) >= 0 and int(indices.max()) < 500
    assert torch.equal(poisson_sample(7, 1.0, generator=generator), torch.arange(7))
    assert poisson_sample(0, 0.5, generator=generator).numel() == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_examples": 10, "sample_rate": 1.3}, r"sample_rate must be in \(0, 1\], got 1.3"),
        ({"num_examples": 10, "sample_rate": 0.0}, r"sample_rate must be in \(0, 1\], got 0.0"),
        ({"num_examples": -1, "sample_rate": 0.5}, r"num_examples must be an integer >= 0, got -1"),
        ({"num_examples": 2.5, "sample_rate": 0.5}, r"num_examples must be an integer >= 0, got 2.5"),
    ],
)
def test_poisson_sample_rejects_bad_arguments_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        poisson_sample(kwargs["num_examples"], kwargs["sample_rate"])


# ---------------------------------------------------------------- per-sample gradients


def test_per_sample_gradients_equal_one_example_at_a_time_loop():
    # Arrange
    model = small_cnn()
    inputs, targets = cnn_batch(6)
    expected = one_at_a_time_gradients(model, inputs, targets)
    # Act
    actual = per_sample_gradients(model, nn.functional.cross_entropy, inputs, targets)
    # Assert
    assert actual.shape == (6, sum(p.numel() for p in model.parameters()))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-12)


def test_per_sample_gradients_rows_are_not_the_batch_gradient():
    # Negative control for the reference: the rows must differ from each other
    # (a vmap that broadcast one gradient would pass a weaker test).
    model = small_cnn()
    inputs, targets = cnn_batch(6)

    actual = per_sample_gradients(model, nn.functional.cross_entropy, inputs, targets)

    assert not torch.allclose(actual[0], actual[1], rtol=1e-3)


@pytest.mark.parametrize("chunk_size", [1, 4, 6])
def test_chunk_size_does_not_change_per_sample_gradients(chunk_size):
    model = small_cnn()
    inputs, targets = cnn_batch(6)

    whole = per_sample_gradients(model, nn.functional.cross_entropy, inputs, targets)
    chunked = per_sample_gradients(model, nn.functional.cross_entropy, inputs, targets, chunk_size=chunk_size)

    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)


def test_frozen_parameters_are_left_out_of_per_sample_gradients():
    model = small_cnn()
    model[0].weight.requires_grad_(False)
    inputs, targets = cnn_batch(3)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    actual = per_sample_gradients(model, nn.functional.cross_entropy, inputs, targets)

    assert actual.shape == (3, trainable)
    torch.testing.assert_close(actual, one_at_a_time_gradients(model, inputs, targets), rtol=1e-5, atol=1e-12)


def test_empty_batch_gives_zero_by_d_gradients():
    model = small_cnn()
    inputs, targets = cnn_batch(0)

    actual = per_sample_gradients(model, nn.functional.cross_entropy, inputs, targets)

    assert actual.shape == (0, sum(p.numel() for p in model.parameters()))


def test_batchnorm_in_training_mode_is_rejected_pointing_to_groupnorm():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).double()
    inputs, targets = cnn_batch(4)

    with pytest.raises(ValueError, match="GroupNorm"):
        per_sample_gradients(model, nn.functional.cross_entropy, inputs, targets)


def test_batchnorm_in_eval_mode_is_accepted_and_per_example():
    # In eval mode BatchNorm uses its running statistics: it no longer mixes examples.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).double()
    model.eval()
    inputs, targets = cnn_batch(4)

    actual = per_sample_gradients(model, nn.functional.cross_entropy, inputs, targets)

    torch.testing.assert_close(actual, one_at_a_time_gradients(model, inputs, targets), rtol=1e-5, atol=1e-12)


def test_mismatched_batch_sizes_are_rejected():
    model = small_cnn()
    inputs, targets = cnn_batch(4)

    with pytest.raises(ValueError, match="same batch size, got 4 and 3"):
        per_sample_gradients(model, nn.functional.cross_entropy, inputs, targets[:3])


# ---------------------------------------------------------------- clipping

finite_rows = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=16),
    elements=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
)
clip_norms = st.floats(min_value=1e-3, max_value=1e3)


@settings(max_examples=200)
@given(finite_rows, clip_norms)
def test_clipped_norm_never_exceeds_clip_norm(rows, clip_norm):
    grads = torch.from_numpy(rows)

    clipped = clip_per_sample(grads, clip_norm=clip_norm)

    assert torch.all(torch.linalg.vector_norm(clipped, dim=1) <= clip_norm * (1 + 1e-6))


@settings(max_examples=200)
@given(finite_rows, clip_norms)
def test_flat_clipping_leaves_rows_inside_the_ball_unchanged_and_keeps_directions(rows, clip_norm):
    grads = torch.from_numpy(rows)
    norms = torch.linalg.vector_norm(grads, dim=1)

    clipped = clip_per_sample(grads, clip_norm=clip_norm)

    inside = norms <= clip_norm
    assert torch.equal(clipped[inside], grads[inside])
    outside = ~inside
    torch.testing.assert_close(
        torch.linalg.vector_norm(clipped[outside], dim=1),
        torch.full((int(outside.sum()),), clip_norm, dtype=torch.float64),
    )
    # Same direction: clipped = positive factor * original.
    assert torch.all((clipped * grads).sum(dim=1) >= 0)


@settings(max_examples=200)
@given(finite_rows, clip_norms)
def test_automatic_clipping_norm_never_exceeds_clip_norm(rows, clip_norm):
    grads = torch.from_numpy(rows)

    clipped = clip_per_sample(grads, clip_norm=clip_norm, clipping="automatic")

    assert torch.all(torch.linalg.vector_norm(clipped, dim=1) <= clip_norm * (1 + 1e-6))


def test_automatic_clipping_is_c_g_over_norm_plus_gamma():
    # Golden value by hand: g = (3, 4), ||g|| = 5, C = 2 -> 2 * g / (5 + gamma).
    grads = torch.tensor([[3.0, 4.0]], dtype=torch.float64)

    clipped = clip_per_sample(grads, clip_norm=2.0, clipping="automatic")

    torch.testing.assert_close(clipped, grads * 2.0 / (5.0 + AUTOMATIC_CLIPPING_GAMMA))


@pytest.mark.parametrize("clipping", ["flat", "automatic"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_row_contributes_zeros_and_leaves_other_rows_alone(clipping, bad_value):
    # A NaN/inf gradient must not turn the release into a deterministic vector.
    grads = torch.tensor([[bad_value, 1.0, 0.0], [0.3, 0.4, 0.0]], dtype=torch.float64)

    clipped = clip_per_sample(grads, clip_norm=1.0, clipping=clipping)

    assert torch.equal(clipped[0], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(clipped[1], clip_per_sample(grads[1:], clip_norm=1.0, clipping=clipping)[0])


def test_non_finite_canary_does_not_fix_the_released_bits():
    # With the canary's NaN gradient the release must still be the sign of x0 + noise (P(+1) ~ 1/2 at x0 = 0),
    # not a constant vector.
    grads = torch.tensor([[0.0] * 4000, [float("nan")] * 4000], dtype=torch.float64)

    bits = dp_sign(grads, clip_norm=1.0, noise_multiplier=1.0, generator=secure_generator(5))

    assert stats.binomtest(int((bits == 1).sum()), 4000, 0.5).pvalue > 1e-3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_norm": 0.0}, r"clip_norm must be a finite number > 0, got 0.0"),
        ({"clip_norm": float("inf")}, r"clip_norm must be a finite number > 0, got inf"),
        ({"clip_norm": 1.0, "clipping": "per-layer"}, r"clipping must be one of \('flat', 'automatic'\)"),
    ],
)
def test_clip_per_sample_rejects_bad_arguments_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        clip_per_sample(torch.ones(2, 3), **kwargs)


def test_clip_per_sample_rejects_non_2d_input():
    with pytest.raises(ValueError, match=r"per_sample_grads must be 2-D \[B, d\], got shape \(3,\)"):
        clip_per_sample(torch.ones(3), clip_norm=1.0)


# ---------------------------------------------------------------- sensitivity of the pre-noise sum


@settings(max_examples=100)
@given(
    batch=st.integers(min_value=0, max_value=6),
    dim=st.integers(min_value=1, max_value=12),
    log_scale=st.floats(min_value=-3, max_value=4),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    clipping=st.sampled_from(["flat", "automatic"]),
)
def test_adding_one_example_moves_pre_noise_sum_by_at_most_clip_norm(batch, dim, log_scale, seed, clipping):
    # Arrange: S random (norms around 10**log_scale, often above C), x random.
    clip_norm = 1.5
    generator = torch.Generator().manual_seed(seed)
    batch_grads = torch.randn(batch, dim, generator=generator, dtype=torch.float64) * 10**log_scale
    extra = torch.randn(1, dim, generator=generator, dtype=torch.float64) * 10**log_scale
    # Act
    without = pre_noise_sum(batch_grads, clip_norm, clipping)
    with_extra = pre_noise_sum(torch.cat([batch_grads, extra]), clip_norm, clipping)
    # Assert
    assert float(torch.linalg.vector_norm(with_extra - without)) <= clip_norm * (1 + 1e-6)


def adversarial_pair(clip_norm: float, dim: int = 10, scale: float = 100.0):
    """x0 = +G u and canary = -3 G u with G = scale * C >> C: D0 = {x0}, D1 = {x0, canary}."""
    generator = torch.Generator().manual_seed(3)
    direction = torch.randn(dim, generator=generator, dtype=torch.float64)
    direction /= torch.linalg.vector_norm(direction)
    big = scale * clip_norm
    world0 = (big * direction).unsqueeze(0)
    world1 = torch.stack([big * direction, -3 * big * direction])
    return world0, world1


def test_adversarial_pair_moves_pre_noise_sum_by_at_most_clip_norm():
    clip_norm = 1.5
    world0, world1 = adversarial_pair(clip_norm)

    shift = pre_noise_sum(world1, clip_norm) - pre_noise_sum(world0, clip_norm)

    assert float(torch.linalg.vector_norm(shift)) <= clip_norm * (1 + 1e-6)


def test_clip_the_mean_moves_adversarial_pair_by_two_clip_norms():
    # Negative control: the source paper's clip-of-mean has sensitivity 2C, and the test sees it.
    clip_norm = 1.5
    world0, world1 = adversarial_pair(clip_norm)

    shift = clip_mean_then_noise(world1, clip_norm=clip_norm, noise_multiplier=0) - clip_mean_then_noise(
        world0, clip_norm=clip_norm, noise_multiplier=0
    )

    shift_norm = float(torch.linalg.vector_norm(shift))
    assert shift_norm > clip_norm
    assert shift_norm == pytest.approx(2 * clip_norm, rel=1e-9)


def test_clipping_each_tensor_separately_exceeds_clip_norm_but_global_clipping_does_not():
    # Negative control: 4 "tensors" each clipped to C give a norm C * sqrt(4) = 2C;
    # our clipping takes one norm over all of them.
    clip_norm = 1.0
    canary = torch.full((1, 8), 50.0, dtype=torch.float64)

    per_tensor = clip_each_tensor_then_sum(canary, clip_norm=clip_norm, num_tensors=4)
    global_norm = pre_noise_sum(canary, clip_norm)

    assert float(torch.linalg.vector_norm(per_tensor)) == pytest.approx(2 * clip_norm)
    assert float(torch.linalg.vector_norm(global_norm)) <= clip_norm * (1 + 1e-6)


# ---------------------------------------------------------------- noise

NUM_COORDINATES = 20_000


def test_zero_gradients_give_plus_one_with_probability_one_half():
    # Arrange: d = 20 000 coordinates of pure noise (an empty batch must still release).
    grads = torch.zeros(0, NUM_COORDINATES)
    # Act
    bits = dp_sign(grads, clip_norm=1.0, noise_multiplier=0.8, generator=secure_generator(21))
    # Assert
    assert bits.shape == (NUM_COORDINATES,)
    assert bits.dtype == torch.int8
    assert set(bits.unique().tolist()) == {-1, 1}
    plus = int((bits == 1).sum())
    assert stats.binomtest(plus, NUM_COORDINATES, 0.5).pvalue > 1e-3
    # Negative control: a sum of 0.1 x noise std per coordinate gives P(+1) = Phi(0.1) = 0.540, which the
    # same test rejects. (C = 1e9 so that the row is not clipped; the noise std stays 0.8.)
    shifted = dp_sign(
        torch.full((1, NUM_COORDINATES), 0.08), clip_norm=1e9, noise_multiplier=0.8e-9, generator=secure_generator(22)
    )
    assert stats.binomtest(int((shifted == 1).sum()), NUM_COORDINATES, 0.5).pvalue < 1e-6


def test_probability_of_plus_one_is_phi_of_sum_over_sigma_c():
    # Arrange: four groups of 5000 coordinates; example k is non-zero only on group k, so the
    # clipped sum on group k is example k's (clipped) value. C = 1, sigma = 0.01.
    # Groups 0-2 hold s / (sigma C) = -1, -0.5, 0.25 (norms <= 0.71 C: not clipped); group 3 holds
    # 1.0 per coordinate, clipped to norm C, i.e. 1 / sqrt(5000) per coordinate: ratio 1.414.
    clip_norm, noise_multiplier, per_group = 1.0, 0.01, 5000
    ratios_in = [-1.0, -0.5, 0.25]
    grads = torch.zeros(4, 4 * per_group, dtype=torch.float64)
    for group, ratio in enumerate(ratios_in):
        grads[group, group * per_group : (group + 1) * per_group] = ratio * noise_multiplier * clip_norm
    grads[3, 3 * per_group :] = 1.0
    expected_ratios = ratios_in + [clip_norm / per_group**0.5 / (noise_multiplier * clip_norm)]
    # Act
    bits = dp_sign(grads, clip_norm=clip_norm, noise_multiplier=noise_multiplier, generator=secure_generator(23))
    # Assert
    for group, ratio in enumerate(expected_ratios):
        group_bits = bits[group * per_group : (group + 1) * per_group]
        plus = int((group_bits == 1).sum())
        assert stats.binomtest(plus, per_group, stats.norm.cdf(ratio)).pvalue > 1e-3 / len(expected_ratios)
        if abs(ratio) >= 0.5:
            # Negative controls: noise std 2/3 or 3/2 of sigma C would give Phi(1.5 r) or Phi(r / 1.5).
            for wrong in (ratio * 1.5, ratio / 1.5):
                assert stats.binomtest(plus, per_group, stats.norm.cdf(wrong)).pvalue < 1e-6


def test_noise_is_gaussian_with_std_sigma_c_and_not_two_thirds_or_three_halves_of_it():
    # Arrange: random gradients (some clipped), d = 20 000, sigma = 1.3, C = 0.7.
    clip_norm, noise_multiplier = 0.7, 1.3
    grads = torch.randn(5, NUM_COORDINATES, generator=torch.Generator().manual_seed(24), dtype=torch.float64) * 0.01
    # Act
    noise = noisy_clipped_sum(
        grads, clip_norm=clip_norm, noise_multiplier=noise_multiplier, generator=secure_generator(25)
    ) - pre_noise_sum(grads, clip_norm)
    # Assert
    scale = noise_multiplier * clip_norm
    assert stats.kstest(noise.numpy(), "norm", args=(0.0, scale)).pvalue > 1e-3
    assert stats.kstest(noise.numpy(), "norm", args=(0.0, scale * 2 / 3)).pvalue < 1e-6
    assert stats.kstest(noise.numpy(), "norm", args=(0.0, scale * 3 / 2)).pvalue < 1e-6


def test_zero_noise_multiplier_releases_the_exact_clipped_sum():
    grads = torch.tensor([[3.0, 4.0], [0.1, -0.2]], dtype=torch.float64)

    total = noisy_clipped_sum(grads, clip_norm=1.0, noise_multiplier=0.0)

    torch.testing.assert_close(total, torch.tensor([0.6 + 0.1, 0.8 - 0.2], dtype=torch.float64))


def test_release_is_reproducible_with_a_seed_and_differs_across_seeds():
    grads = torch.zeros(0, 256)

    first = dp_sign(grads, clip_norm=1.0, noise_multiplier=1.0, generator=secure_generator(7))
    again = dp_sign(grads, clip_norm=1.0, noise_multiplier=1.0, generator=secure_generator(7))
    other = dp_sign(grads, clip_norm=1.0, noise_multiplier=1.0, generator=secure_generator(8))

    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_default_generator_is_unseeded_so_two_releases_differ():
    grads = torch.zeros(0, 256)

    assert not torch.equal(
        dp_sign(grads, clip_norm=1.0, noise_multiplier=1.0), dp_sign(grads, clip_norm=1.0, noise_multiplier=1.0)
    )


@pytest.mark.parametrize("bad", [-0.1, float("inf"), float("nan")])
def test_noise_multiplier_must_be_finite_and_non_negative(bad):
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number >= 0"):
        dp_sign(torch.zeros(1, 3), clip_norm=1.0, noise_multiplier=bad)
