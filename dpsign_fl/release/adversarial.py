"""Adversarial copies of a client's sampled examples, made on the device before the clipped sum.

A client that trains for robustness (Madry et al. 2018, arXiv:1706.06083)
replaces each sampled example by an adversarial copy within an L-infinity
ball of radius ``epsilon`` (pixel units of [0, 1]) and takes the example's
clipped gradient at that copy. Two attacks: ``"pgd"`` (``steps`` signed
gradient steps from a uniform random start, each projected back into the ball
and the valid pixel range) and ``"fgsm-rs"`` (the same with one step: Wong,
Rice, Kolter 2020, arXiv:2001.03994, "fast is better than free").

Privacy: example i's copy is computed from example i, the current model and
data-independent random bits only. The attack ascends the SUM of per-example
losses, whose gradient w.r.t. input i is the gradient of loss i alone for a
model without cross-example layers (this project's models: no BatchNorm,
which :func:`dpsign_fl.release.mechanism._reject_batchnorm` refuses; every
other layer acts on one example). So example i's clipped gradient is a
function of example i (and of random bits drawn independently of the data),
the sum's sensitivity stays ``clip_norm`` under add/remove one example, and
the accounting is unchanged (docs/privacy.md).

Inputs here are normalised, ``(pixel - mean) / std`` per channel
(:func:`dpsign_fl.data.pixel_statistics`): the ball's radius and the step are
divided by ``std`` per channel, and copies are clamped to the normalised
images of 0 and 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

ATTACKS = ("none", "fgsm-rs", "pgd")
"""The run-config ``adversarial-training`` choices; ``"none"`` trains on the clean examples."""

FGSM_STEP_FACTOR = 1.25
"""fgsm-rs's automatic step, in units of epsilon (Wong et al. 2020, arXiv:2001.03994, Sec. 4: alpha = 1.25 eps)."""

PGD_STEP_FACTOR = 2.5
"""pgd's automatic step is ``PGD_STEP_FACTOR * epsilon / steps`` (Madry et al. 2018's rule of thumb)."""

EVALUATION_STEPS = 20
"""The server's robust evaluation: PGD with this many steps of 2.5 eps / 20 from one random start."""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AdversarialSettings:
    """How a client makes the adversarial copy of each sampled example.

    Attributes:
        attack: ``"fgsm-rs"`` or ``"pgd"``.
        epsilon: L-infinity radius in pixel units of [0, 1], in (0, 1].
        steps: signed-gradient steps (pgd); fgsm-rs takes one.
        step_size: each step in pixel units; 0 = automatic
            (:data:`FGSM_STEP_FACTOR` * eps, or :data:`PGD_STEP_FACTOR` * eps / steps).
        mean, std: the per-channel normalisation of the inputs (pixel = x * std + mean).
    """

    attack: str
    epsilon: float
    steps: int
    step_size: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS[1:]:
            raise ValueError(f"attack must be one of {ATTACKS[1:]}, got {self.attack!r}")
        if not 0 < self.epsilon <= 1:
            raise ValueError(f"epsilon must be in (0, 1], got {self.epsilon!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= 1000:
            raise ValueError(f"steps must be an integer in [1, 1000], got {self.steps!r}")
        if not 0 <= self.step_size <= 1:
            raise ValueError(f"step_size must be in [0, 1], got {self.step_size!r}")
        if not self.mean or len(self.mean) != len(self.std):
            raise ValueError(f"mean and std must have one entry per channel, got {self.mean!r} and {self.std!r}")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ValueError(f"std must be finite and > 0 per channel, got {self.std!r}")

    @property
    def num_steps(self) -> int:
        """The steps the attack takes: one for fgsm-rs, ``steps`` for pgd."""
        return 1 if self.attack == "fgsm-rs" else self.steps

    @property
    def pixel_step(self) -> float:
        """One step in pixel units (``step_size``, or the automatic one)."""
        if self.step_size > 0:
            return self.step_size
        if self.attack == "fgsm-rs":
            return FGSM_STEP_FACTOR * self.epsilon
        return PGD_STEP_FACTOR * self.epsilon / self.steps


def evaluation_attack(epsilon: float, *, mean: tuple[float, ...], std: tuple[float, ...]) -> AdversarialSettings:
    """The server's robust-accuracy attack: PGD-20, step 2.5 eps / 20, one random start, at ``epsilon``."""
    return AdversarialSettings("pgd", epsilon, EVALUATION_STEPS, PGD_STEP_FACTOR * epsilon / EVALUATION_STEPS, mean, std)


def random_start(inputs: torch.Tensor, settings: AdversarialSettings, *, generator: torch.Generator) -> torch.Tensor:
    """Return ``inputs`` plus uniform noise in the ball, clamped to the pixel range (the attack's start).

    The noise is drawn from ``generator`` (the release's own), independently of the data.
    """
    radius, low, high = _bounds(inputs, settings)
    noise = torch.rand(inputs.shape, generator=generator, dtype=inputs.dtype, device=inputs.device)
    return torch.minimum(torch.maximum(inputs + (2 * noise - 1) * radius, low), high)


def attack_from(
    model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, start: torch.Tensor,
    settings: AdversarialSettings,
) -> torch.Tensor:
    """Take the attack's signed-gradient steps from ``start``; return the adversarial copies of ``inputs``.

    Each step ascends the sum of the per-example losses (``loss_fn`` is their
    mean; the sign of a gradient does not see the factor B), then projects
    onto the ball around each clean example and the pixel range. Only the
    inputs are differentiated: the model's parameters and ``.grad`` are untouched.

    Args:
        model: the model (its mode is left as it is).
        loss_fn: ``loss_fn(outputs, targets)``, the mean of per-example losses.
        inputs: ``[B, C, ...]`` clean, normalised examples.
        targets: ``[B]`` labels.
        start: ``[B, C, ...]`` the start (:func:`random_start`).
        settings: the attack.

    Returns:
        ``[B, C, ...]`` detached adversarial copies.
    """
    radius, low, high = _bounds(inputs, settings)
    step = radius * (settings.pixel_step / settings.epsilon)
    lower, upper = torch.maximum(inputs - radius, low), torch.minimum(inputs + radius, high)
    current = start.detach()
    for _ in range(settings.num_steps):
        current.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(model(current), targets)
            (gradient,) = torch.autograd.grad(loss, [current])
        current = torch.minimum(torch.maximum(current.detach() + step * gradient.sign(), lower), upper)
    return current.detach()


def adversarial_examples(
    model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, settings: AdversarialSettings,
    *, generator: torch.Generator,
) -> torch.Tensor:
    """Return the adversarial copy of every example: :func:`random_start`, then :func:`attack_from`.

    Privacy: copy i depends on example i, the model and ``generator``'s draws
    only (module docstring); nothing is released here.

    Raises:
        ValueError: if the inputs' channels (dim 1) do not match the settings' statistics.
    """
    if inputs.shape[0] == 0:
        return inputs
    start = random_start(inputs, settings, generator=generator)
    return attack_from(model, loss_fn, inputs, targets, start, settings)


def _bounds(inputs: torch.Tensor, settings: AdversarialSettings):
    """Per channel, in normalised units: the ball's radius and the images of pixels 0 and 1."""
    channels = len(settings.std)
    if inputs.ndim < 2 or inputs.shape[1] != channels or not inputs.is_floating_point():
        raise ValueError(
            f"inputs must be floating [B, {channels}, ...] images, got {inputs.dtype} {list(inputs.shape)}"
        )
    shape = (1, channels) + (1,) * (inputs.ndim - 2)
    mean = torch.tensor(settings.mean, dtype=inputs.dtype, device=inputs.device).view(shape)
    std = torch.tensor(settings.std, dtype=inputs.dtype, device=inputs.device).view(shape)
    return settings.epsilon / std, (0 - mean) / std, (1 - mean) / std
