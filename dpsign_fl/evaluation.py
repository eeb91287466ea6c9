"""The server's evaluation of the global model on a held-out test set."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .release.adversarial import AdversarialSettings, adversarial_examples

ROBUST_EVALUATION_EXAMPLES = 1000
"""Robust accuracy is measured on the first this-many test examples.

PGD-20 costs 21 forward and backward passes per example (measured for
tanh-cnn on a loaded 2-core machine: about 1.5 ms per example and step, so
the whole MNIST test set would take minutes per evaluation); 1,000 examples
give a standard error of at most 1.6 points.
"""


@torch.no_grad()
def evaluate(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    batch_size: int = 2048,
    loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
) -> tuple[float, float]:
    """Return (mean loss, accuracy) of ``model`` over every prediction of a labelled set, in eval mode.

    A prediction is one target entry: one per example for a classifier
    (outputs ``[B, classes]``, targets ``[B]``), one per position for a
    sequence model (outputs ``[B, classes, T]``, targets ``[B, T]``:
    next-character accuracy over all positions of the test chunks). Classes
    are on dim 1 of the outputs in both cases, as ``F.cross_entropy`` takes them.

    Privacy: run on the server's test set only; a client's accuracy on its own
    data would be a release outside the DP guarantee.

    Args:
        model: the model; put back in its mode afterwards.
        inputs: ``[N, ...]`` examples.
        targets: ``[N]`` or ``[N, T]`` class ids.
        batch_size: predictions per forward pass: examples for a classifier,
            ``batch_size // T`` chunks (at least one) for a sequence model
            (measured for ``char-transformer``, T = 80, one thread: 32 chunks
            per pass took 0.9 ms per chunk, 2048 took 2.1 ms and 600 MiB more).
        loss_fn: ``loss_fn(outputs, targets, reduction="sum")``, summed over predictions.

    Returns:
        (loss summed over predictions / their number, the share of correct
        argmax predictions); (0, 0) for an empty set.
    """
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    step = max(1, batch_size // max(1, math.prod(targets.shape[1:])))
    for start in range(0, inputs.shape[0], step):
        outputs = model(inputs[start : start + step])
        batch_targets = targets[start : start + step]
        total_loss += float(loss_fn(outputs, batch_targets, reduction="sum"))
        correct += int((outputs.argmax(dim=1) == batch_targets).sum())
    model.train(was_training)
    count = max(targets.numel(), 1)
    return total_loss / count, correct / count


@torch.no_grad()
def class_accuracies(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, batch_size: int = 2048) -> dict[int, float]:
    """Return the accuracy of ``model`` on the examples of each class present in ``targets``, in eval mode.

    A targeted attack can ruin one class and barely move the overall
    accuracy; the smallest of these values shows it. Privacy: as
    :func:`evaluate`, the server's test set only.
    """
    was_training = model.training
    model.eval()
    predictions = torch.cat([model(inputs[start : start + batch_size]).argmax(dim=1) for start in range(0, inputs.shape[0], batch_size)])
    model.train(was_training)
    return {
        int(label): float((predictions[targets == label] == label).float().mean())
        for label in torch.unique(targets).tolist()
    }


def robust_accuracy(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    attack: AdversarialSettings,
    *,
    generator: torch.Generator,
    batch_size: int = 1000,
    max_examples: int | None = ROBUST_EVALUATION_EXAMPLES,
) -> float:
    """Return the share of examples ``model`` still classifies right after ``attack`` (eval mode).

    The server's robust accuracy (:func:`dpsign_fl.release.adversarial.evaluation_attack`:
    PGD-20 from one random start); a classifier's ``[B, classes]`` outputs only.
    Privacy: the server's test set only, as :func:`evaluate`.

    Args:
        model: the model; put back in its mode afterwards.
        inputs: ``[N, C, ...]`` normalised images.
        targets: ``[N]`` class ids.
        attack: the attack (its radius and the pixel statistics).
        generator: the random starts.
        batch_size: examples attacked together.
        max_examples: attack only the first this-many examples (None = all).

    Returns:
        correct predictions at the adversarial copies / the examples attacked; 0 for an empty set.
    """
    if max_examples is not None:
        inputs, targets = inputs[:max_examples], targets[:max_examples]
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, inputs.shape[0], batch_size):
            batch, batch_targets = inputs[start : start + batch_size], targets[start : start + batch_size]
            adversarial = adversarial_examples(model, F.cross_entropy, batch, batch_targets, attack, generator=generator)
            with torch.no_grad():
                correct += int((model(adversarial).argmax(dim=1) == batch_targets).sum())
    finally:
        model.train(was_training)
    return correct / max(inputs.shape[0], 1)
