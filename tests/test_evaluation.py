"""Tests of dpsign_fl.evaluation: loss and accuracy per prediction, for classifiers and sequence models."""

import math

import torch
from torch import nn
from torch.nn import functional as F

from dpsign_fl.evaluation import evaluate


class FixedLogits(nn.Module):
    """Looks the logits up by example: column 0 of each input row is the example's index."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, inputs):
        return self.logits[inputs[:, 0].long()]


def indices(count, width):
    return torch.arange(count).unsqueeze(1).expand(count, width).contiguous()


def test_sequence_accuracy_is_the_share_of_correct_positions_over_all_chunks():
    # 3 chunks of 4 positions, 5 classes; logits [B, classes, T] favour class (b + t) % 5.
    batch, classes, steps = 3, 5, 4
    best = (torch.arange(batch).unsqueeze(1) + torch.arange(steps)) % classes  # [B, T]
    logits = F.one_hot(best, classes).permute(0, 2, 1).float() * 3.0
    targets = best.clone()
    targets[0, :3] = (targets[0, :3] + 1) % classes  # 3 of 12 positions wrong, all in chunk 0
    inputs = indices(batch, steps)

    loss, accuracy = evaluate(FixedLogits(logits), inputs, targets, batch_size=2)

    assert accuracy == 9 / 12  # per position; per chunk (correct chunks / chunks) would give 2 / 3
    assert math.isclose(loss, float(F.cross_entropy(logits, targets)), rel_tol=1e-6)


def test_classifier_loss_and_accuracy_are_per_example():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    targets = torch.tensor([0, 1, 1])

    loss, accuracy = evaluate(FixedLogits(logits), indices(3, 7).float(), targets, batch_size=2)

    assert accuracy == 2 / 3
    assert math.isclose(loss, float(F.cross_entropy(logits, targets)), rel_tol=1e-6)


def test_model_mode_is_restored():
    model = FixedLogits(torch.zeros(2, 3)).train()

    evaluate(model, indices(2, 1), torch.zeros(2, dtype=torch.int64))

    assert model.training


class BatchRecorder(nn.Module):
    """Records the batch size of every call; predicts class 0 everywhere."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, inputs):
        self.batches.append(inputs.shape[0])
        return torch.zeros(inputs.shape[0], 3, *inputs.shape[1:])


def test_a_forward_pass_holds_at_most_batch_size_predictions():
    model = BatchRecorder()
    chunks = torch.zeros(50, 8, dtype=torch.int64)

    evaluate(model, chunks, torch.zeros(50, 8, dtype=torch.int64), batch_size=100)  # 12 chunks of 8 positions
    evaluate(model, chunks, torch.zeros(50, 8, dtype=torch.int64), batch_size=3)  # fewer than one chunk: 1

    assert model.batches == [12, 12, 12, 12, 2] + [1] * 50
