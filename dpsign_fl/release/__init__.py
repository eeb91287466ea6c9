"""One client's DP-SIGN release from its local data, and where its randomness comes from.

:func:`client_release` is the mechanism end to end: Poisson-sample the local
data, per-example gradients, clip each to ``clip_norm``, sum, add Gaussian
noise, sign (:mod:`dpsign_fl.release.mechanism` holds the pieces). The Flower
ClientApp, the drop-in helper and the research loop all release through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .adversarial import AdversarialSettings, adversarial_examples
from .clipped_sum import clipped_gradient_sum
from .momentum import ClientMomentum
from .mechanism import (
    CLIPPING_MODES,
    _check_noise_multiplier,
    _check_sample_rate,
    check_release_clip_norm,
    noisy_clipped_sum,
    noisy_sum,
    per_sample_gradients,
    poisson_sample,
    secure_generator,
    to_signs,
)

MAX_MODEL_MAGNITUDE = 1e6
"""The largest absolute value a model entry may hold when a client releases at it.

The model comes from the server, which may be hostile: a client refuses to
release at a model with a non-finite entry or one beyond this bound (a
trained model of this project holds values of order 1-10; huge values only
serve to push the per-example gradients out of float32's range).
"""

DEFAULT_CHUNK_SIZE = 256
"""Examples per vmap chunk where per-example gradients are materialised (a per-example transform)."""

PerExampleTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""``transform(grads [B, d], generator) -> grads [B, d]``, applied before clipping (the experiments' seam)."""


@dataclass(frozen=True)
class ReleaseSettings:
    """The privacy parameters of one client's DP-SIGN release.

    Attributes:
        sample_rate: q, the Poisson sampling rate.
        clip_norm: C, the L2 bound on each example's whole gradient.
        noise_multiplier: sigma; the noise std is sigma * C.
        clipping: ``"flat"`` or ``"automatic"``.
        adversarial: None, or how each sampled example is replaced by its
            adversarial copy before its gradient is taken
            (:mod:`dpsign_fl.release.adversarial`; the sensitivity is unchanged).
    """

    sample_rate: float
    clip_norm: float
    noise_multiplier: float
    clipping: str = "flat"
    adversarial: AdversarialSettings | None = None

    def __post_init__(self) -> None:
        _check_sample_rate(self.sample_rate)
        check_release_clip_norm(self.clip_norm)
        _check_noise_multiplier(self.noise_multiplier)
        if self.clipping not in CLIPPING_MODES:
            raise ValueError(f"clipping must be one of {CLIPPING_MODES}, got {self.clipping!r}")
        if self.adversarial is not None and not isinstance(self.adversarial, AdversarialSettings):
            raise TypeError(f"adversarial must be None or AdversarialSettings, got {type(self.adversarial).__name__}")


class UnsafeRelease(ValueError):
    """The model a release would be made at is not safe to release at; nothing was sampled.

    Raised before any data is read, from what the server sent alone, so
    refusing is data-independent and costs no privacy budget.
    """


def check_release_model(model: nn.Module) -> None:
    """Raise :class:`UnsafeRelease` unless every floating entry of ``model`` is finite and within :data:`MAX_MODEL_MAGNITUDE`.

    Parameters and buffers both: a buffer (e.g. a normalisation statistic)
    shapes the per-example gradients as much as a weight does.
    """
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in tensors:
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        largest = float(tensor.detach().abs().max())
        if not largest <= MAX_MODEL_MAGNITUDE:  # also catches NaN
            raise UnsafeRelease(
                f"model entry {name} must be finite with magnitude <= {MAX_MODEL_MAGNITUDE:g}, got largest magnitude {largest!r}"
            )


def client_release(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    settings: ReleaseSettings,
    *,
    generator: torch.Generator | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    per_example_transform: PerExampleTransform | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    momentum: ClientMomentum | None = None,
) -> torch.Tensor:
    """Make one DP-SIGN release from a client's local data at the current model.

    Privacy: one Sampled Gaussian Mechanism SGM(q, sigma) release of this
    client's data under add/remove-one neighbours (Mironov, Talwar, Zhang 2019,
    arXiv:1908.10530, Def. 4): each example is sampled with probability q,
    each sampled example's gradient is clipped to norm C over all parameters
    (sensitivity C of the sum), noise N(0, (sigma C)^2 I) is added, and only
    the sign is released. An empty sample still releases the sign of pure noise.
    With ``settings.adversarial``, each sampled example's gradient is taken at
    its adversarial copy, a function of that example, the model and random
    starts drawn from ``generator`` (:mod:`dpsign_fl.release.adversarial`):
    each clipped gradient still depends on one example, so the sensitivity
    and the accounting are the same.
    Randomness: ``generator``, or one seeded from the OS's secure source.
    Hostile input: the model is checked (:func:`check_release_model`) and the
    settings were checked when built (:class:`ReleaseSettings`: C in
    [MIN_CLIP_NORM, MAX_CLIP_NORM]) before any example is sampled; the noise
    is added in float64 (:func:`dpsign_fl.release.mechanism.noisy_sum`).

    Args:
        model: the current global model (read only).
        inputs, targets: the client's whole local training set.
        settings: sample rate, clip norm, noise multiplier, clipping mode.
        generator: randomness for sampling and noise; None = OS secure source.
        loss_fn: ``loss_fn(outputs, targets)`` on a batch: the MEAN of the
            per-example losses (as ``F.cross_entropy``).
        per_example_transform: None, or a function applied to the ``[B, d]``
            per-example gradients before clipping: the one seam experiments
            use (synthetic gradient noise, :mod:`dpsign_fl.experiments.hooks`).
            Clipping follows it, so the sensitivity stays ``clip_norm``
            whatever it returns. This path materialises the per-example gradients.
        chunk_size: examples per vmap chunk of that path.
        momentum: None, or this client's :class:`ClientMomentum`: the noisy
            sum is folded into it and the sign of the momentum is released
            (post-processing of this and earlier releases: the same accounting).

    Returns:
        int8 tensor ``[d]`` of +-1, d = number of trainable parameters.

    Raises:
        UnsafeRelease: before sampling, if the model holds a non-finite or huge value.
    """
    check_release_model(model)
    generator = generator if generator is not None else secure_generator()
    indices = poisson_sample(inputs.shape[0], settings.sample_rate, generator=generator)
    batch_inputs, batch_targets = inputs[indices], targets[indices]
    if settings.adversarial is not None:
        batch_inputs = adversarial_examples(
            model, loss_fn, batch_inputs, batch_targets, settings.adversarial, generator=generator
        )
    if per_example_transform is not None:
        grads = per_sample_gradients(model, loss_fn, batch_inputs, batch_targets, chunk_size=chunk_size)
        grads = per_example_transform(grads, generator)
        noisy = noisy_clipped_sum(
            grads, clip_norm=settings.clip_norm, noise_multiplier=settings.noise_multiplier,
            clipping=settings.clipping, generator=generator,
        )
    else:
        total = clipped_gradient_sum(
            model, loss_fn, batch_inputs, batch_targets, clip_norm=settings.clip_norm, clipping=settings.clipping
        )
        noisy = noisy_sum(total, clip_norm=settings.clip_norm, noise_multiplier=settings.noise_multiplier, generator=generator)
    return to_signs(noisy if momentum is None else momentum.add(noisy))


def seeded_generator(seed: int, *, client: int, stream: int) -> torch.Generator:
    """Return a reproducible generator for one client and stream (experiments only: NOT private).

    ``stream``: the round number in simulation, a node's count of releases with
    its own ``noise-seed``. Anyone who knows ``seed``, the client number and the
    stream can rebuild the client's sampling and noise, so releases drawn from
    it are not private against them. Distinct per client and stream: two
    releases must never share one.
    """
    mixed = np.random.SeedSequence([int(seed), int(client), int(stream)]).generate_state(2)
    return secure_generator(int(mixed[0]) << 31 ^ int(mixed[1]))
