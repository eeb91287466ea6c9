"""Jin et al. 2020's dp-sign calibration, and what it really costs.

Jin et al. (arXiv:2002.10940, Sec. 5, dp-sign) calibrate the Gaussian noise of
EACH step to a per-step (epsilon, delta) with the classical Gaussian-mechanism
bound sigma = C * sqrt(2 ln(1.25 / delta)) / epsilon (Dwork & Roth 2014,
Thm A.1) and never compose over steps. Over T steps the guarantee is much
weaker; :func:`jin_true_epsilon` reports it under our accountant. Their
"rectified" version, per-step (epsilon / T, delta / T), is private (basic
composition) but needs enormous noise.
"""

from __future__ import annotations

import math

from ..privacy.accounting import check_delta, check_epsilon, compute_epsilon


def jin_noise_multiplier(*, epsilon_per_step: float, delta_per_step: float) -> float:
    """Return Jin et al.'s per-step noise multiplier sqrt(2 ln(1.25/delta)) / epsilon.

    Raises:
        ValueError: on a bad epsilon or delta.
    """
    check_epsilon(epsilon_per_step, name="epsilon_per_step")
    check_delta(delta_per_step, name="delta_per_step")
    return math.sqrt(2.0 * math.log(1.25 / delta_per_step)) / epsilon_per_step


def jin_true_epsilon(
    *,
    epsilon_per_step: float,
    delta_per_step: float,
    sample_rate: float,
    num_steps: int,
    target_delta: float,
    accountant: str = "pld",
) -> float:
    """Return the composed epsilon, at ``target_delta``, of T steps of Jin et al.'s dp-sign.

    Each step is SGM(sample_rate, :func:`jin_noise_multiplier`) on a sum of
    per-example gradients clipped to C; composition over ``num_steps`` steps.
    """
    sigma = jin_noise_multiplier(epsilon_per_step=epsilon_per_step, delta_per_step=delta_per_step)
    return compute_epsilon(
        sample_rate=sample_rate,
        noise_multiplier=sigma,
        num_steps=num_steps,
        target_delta=target_delta,
        accountant=accountant,
    )
