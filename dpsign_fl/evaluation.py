"""The server's evaluation of the global model on a held-out test set."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F


@torch.no_grad()
def evaluate(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    batch_size: int = 2048,
    loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
) -> tuple[float, float]:
    """Return (mean loss, accuracy) of ``model`` on a labelled set, in eval mode.

    Privacy: run on the server's test set only; a client's accuracy on its own
    data would be a release outside the DP guarantee.
    """
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
