"""Baseline sign compressors, for comparison with DP-SIGN.

None of these is differentially private on its own except :func:`jin_dp_sign`,
whose per-step calibration is NOT private over training (see
:mod:`dpsign_fl.experiments.jin`).
"""

from __future__ import annotations

import torch

from ..release.mechanism import dp_sign, secure_generator, to_signs
from .jin import jin_noise_multiplier


def sign(gradient: torch.Tensor) -> torch.Tensor:
    """signSGD (Bernstein et al. 2019): the sign of the gradient, exact zeros to +1 (int8)."""
    return to_signs(gradient)


def sto_sign(gradient: torch.Tensor, *, bound: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Jin et al. 2020's sto-sign: +1 with probability 1/2 + g / (2b), else -1.

    Args:
        gradient: ``[d]`` gradient.
        bound: b > 0 with |g_j| <= b; larger entries are clamped to +-b first.
        generator: randomness; None = seeded from the OS's secure source.

    Returns:
        int8 ``[d]`` of +-1, unbiased for g / b.

    Raises:
        ValueError: if ``bound`` is not > 0.
    """
    if not bound > 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    generator = generator if generator is not None else secure_generator(device=gradient.device)
    probability = 0.5 + torch.clamp(gradient, -bound, bound) / (2.0 * bound)
    uniform = torch.rand(gradient.shape, generator=generator, device=gradient.device, dtype=gradient.dtype)
    return torch.where(uniform < probability, 1, -1).to(torch.int8)


def jin_dp_sign(
    per_sample_grads: torch.Tensor,
    *,
    clip_norm: float,
    epsilon_per_step: float,
    delta_per_step: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Jin et al. 2020's dp-sign: our DP-SIGN release with their per-step noise.

    The noise multiplier is sqrt(2 ln(1.25/delta)) / epsilon for the PER-STEP
    (epsilon, delta); its true guarantee over T steps is
    :func:`dpsign_fl.experiments.jin.jin_true_epsilon`.
    """
    sigma = jin_noise_multiplier(epsilon_per_step=epsilon_per_step, delta_per_step=delta_per_step)
    return dp_sign(per_sample_grads, clip_norm=clip_norm, noise_multiplier=sigma, generator=generator)
