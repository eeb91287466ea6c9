"""Synthetic heavy-tailed gradient noise, for experiments on robustness.

Kornilov et al. 2025 ("Sign Operator for Coping with Heavy-Tailed Noise",
arXiv:2502.07923, Sec. 4.1) add symmetric alpha-stable noise (alpha = 1.6,
scale 0.25: infinite variance) to the gradients to show that sign-based
methods tolerate heavy tails; Gaussian noise of the same scale is the
light-tailed control.

This noise is NOT privacy noise: it is not calibrated to any sensitivity and
gives no differential-privacy guarantee. The privacy noise is added in
:mod:`dpsign_fl.release.mechanism`.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from scipy.stats import levy_stable

GRADIENT_NOISES = ("none", "gaussian", "levy")


def add_gradient_noise(
    gradients: torch.Tensor,
    *,
    kind: str,
    scale: float = 0.25,
    alpha: float = 1.6,
    generator: np.random.Generator | torch.Generator | None,
) -> torch.Tensor:
    """Return ``gradients`` plus independent synthetic noise on every entry.

    Not privacy noise (see the module docstring).

    - ``"none"``: ``gradients`` itself, unchanged.
    - ``"gaussian"``: N(0, scale^2).
    - ``"levy"``: symmetric alpha-stable S(alpha, beta=0, scale, 0), drawn by
      ``scipy.stats.levy_stable.rvs`` (the Chambers-Mallows-Stuck method;
      ~0.25 s per million draws). With beta = 0 scipy's S0 and S1
      parameterisations coincide, so its global ``parameterization`` setting
      does not matter. alpha = 2 is N(0, 2 scale^2); alpha < 2 has infinite
      variance.

    Args:
        gradients: a floating-point tensor of any shape and device.
        kind: one of ``GRADIENT_NOISES``.
        scale: noise scale, > 0 (the std for ``"gaussian"``).
        alpha: stability index in (0, 2] (``"levy"`` only).
        generator: the source of randomness: a numpy ``Generator``, a
            ``torch.Generator`` (a numpy generator is seeded from it), or None
            for fresh OS entropy.

    Returns:
        A new tensor of the same shape, dtype and device (or ``gradients``
        itself for ``"none"``).

    Raises:
        ValueError: for an unknown kind or a bad scale or alpha.
        TypeError: if ``gradients`` is not floating point or ``generator`` is
            of another type.
    """
    if kind not in GRADIENT_NOISES:
        raise ValueError(f"kind must be one of {GRADIENT_NOISES}, got {kind!r}")
    if not torch.is_floating_point(gradients):
        raise TypeError(f"gradients must be a floating-point tensor, got {gradients.dtype}")
    if kind == "none":
        return gradients
    if not (isinstance(scale, numbers.Real) and 0 < scale < math.inf):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    rng = _numpy_generator(generator)
    size = tuple(gradients.shape)
    if kind == "gaussian":
        noise = rng.normal(0.0, float(scale), size=size)
    else:
        if not (isinstance(alpha, numbers.Real) and 0 < alpha <= 2):
            raise ValueError(f"alpha must be in (0, 2], got {alpha!r}")
        noise = levy_stable.rvs(float(alpha), 0.0, loc=0.0, scale=float(scale), size=size, random_state=rng)
    return gradients + torch.as_tensor(noise, dtype=gradients.dtype, device=gradients.device)


def _numpy_generator(generator: np.random.Generator | torch.Generator | None) -> np.random.Generator:
    if generator is None:
        return np.random.default_rng()
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):
        seed = torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device)
        return np.random.default_rng(int(seed.item()))
    raise TypeError(
        f"generator must be a numpy Generator, a torch.Generator or None, got {type(generator).__name__}"
    )
