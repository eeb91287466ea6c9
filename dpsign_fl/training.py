"""One client's DP-SIGN step and the server's evaluation, shared by the Flower
apps and the in-process research loop (so both run the SAME code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .gradient_noise import add_gradient_noise
from .mechanism import dp_sign, per_sample_gradients, poisson_sample, secure_generator

DEFAULT_CHUNK_SIZE = 256
"""Examples per vmap chunk of per-sample gradients: bounds memory on devices."""


@dataclass(frozen=True)
class ReleaseSettings:
    """The privacy parameters of one client's DP-SIGN release."""

    sample_rate: float
    clip_norm: float
    noise_multiplier: float
    clipping: str = "flat"


def client_release(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    settings: ReleaseSettings,
    *,
    generator: torch.Generator | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    gradient_noise: str = "none",
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Make one DP-SIGN release from a client's local data at the current model.

    Poisson-samples the local data with ``settings.sample_rate``, computes
    per-example gradients, then :func:`dpsign_fl.mechanism.dp_sign` (clip each to
    ``clip_norm``, sum, add N(0, (sigma*C)^2), sign). Privacy: one SGM(q, sigma)
    release of this client's data (add/remove-one neighbours). An empty sample
    still releases the sign of pure noise.

    Args:
        model: the current global model (read only).
        inputs, targets: the client's whole local training set.
        settings: sample rate, clip norm, noise multiplier, clipping mode.
        generator: randomness for sampling and noise; None = OS secure source.
        loss_fn: per-batch loss, applied to batches of one example.
        gradient_noise: experiment-only noise added to each per-example gradient
            before clipping (``dpsign_fl.gradient_noise``); not privacy noise.
        chunk_size: examples per vmap chunk.

    Returns:
        int8 tensor ``[d]`` of +-1, d = number of trainable parameters.
    """
    generator = generator if generator is not None else secure_generator()
    indices = poisson_sample(inputs.shape[0], settings.sample_rate, generator=generator)
    grads = per_sample_gradients(model, loss_fn, inputs[indices], targets[indices], chunk_size=chunk_size)
    if gradient_noise != "none":
        grads = add_gradient_noise(grads, kind=gradient_noise, generator=generator)
    return dp_sign(
        grads,
        clip_norm=settings.clip_norm,
        noise_multiplier=settings.noise_multiplier,
        clipping=settings.clipping,
        generator=generator,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    batch_size: int = 2048,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> tuple[float, float]:
    """Return (mean loss, accuracy) of ``model`` on a labelled set, in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, inputs.shape[0], batch_size):
        outputs = model(inputs[start : start + batch_size])
        batch_targets = targets[start : start + batch_size]
        total_loss += float(loss_fn(outputs, batch_targets, reduction="sum"))
        correct += int((outputs.argmax(dim=1) == batch_targets).sum())
    model.train(was_training)
    count = max(inputs.shape[0], 1)
    return total_loss / count, correct / count


def flat_parameters(model: nn.Module) -> np.ndarray:
    """Return the trainable parameters as one float32 vector, in ``parameters()`` order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).cpu().numpy()


def load_flat_parameters(model: nn.Module, flat: np.ndarray) -> None:
    """Write a vector from :func:`flat_parameters` back into ``model``.

    Raises:
        ValueError: if the vector's length differs from the model's size.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    expected = sum(p.numel() for p in params)
    if flat.shape != (expected,):
        raise ValueError(f"flat parameters must have shape ({expected},), got {flat.shape}")
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(torch.from_numpy(np.ascontiguousarray(flat[offset : offset + p.numel()])).view_as(p))
            offset += p.numel()


def client_generator(seed: int | None, *, partition_id: int, server_round: int) -> torch.Generator:
    """Return the client's generator for one round.

    With ``seed=None`` (the default for real runs) it is seeded from the OS's
    secure source; a fixed seed gives reproducible experiments, distinct per
    client and round.
    """
    if seed is None:
        return secure_generator()
    mixed = np.random.SeedSequence([int(seed), int(partition_id), int(server_round)]).generate_state(2)
    return secure_generator(int(mixed[0]) << 31 ^ int(mixed[1]))
