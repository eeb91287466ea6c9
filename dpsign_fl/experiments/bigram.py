"""The bigram floor of next-character prediction: the accuracy any trained model must beat.

A bigram model predicts, for each character, the character that most often
followed it in the training chunks (counted over every position of every
chunk; ties go to the smaller id). It is fitted on all training chunks at once,
without privacy: a floor to compare with, not a run.
"""

from __future__ import annotations

import time

import numpy as np
import torch


def bigram_predictions(train_inputs, train_targets, *, num_symbols: int) -> np.ndarray:
    """Return the most frequent next symbol after each symbol: ``[num_symbols]`` int64.

    Args:
        train_inputs: ``[N, T]`` symbol ids; position t is read to predict ``train_targets[:, t]``.
        train_targets: ``[N, T]`` symbol ids, the next character of each position.
        num_symbols: ids lie in ``[0, num_symbols)``.

    Raises:
        ValueError: when the shapes differ or an id lies outside ``[0, num_symbols)``.
    """
    inputs, targets = np.asarray(train_inputs).ravel(), np.asarray(train_targets).ravel()
    if np.shape(train_inputs) != np.shape(train_targets):
        raise ValueError(f"train_targets must have the shape of train_inputs {np.shape(train_inputs)}, got {np.shape(train_targets)}")
    for name, ids in (("train_inputs", inputs), ("train_targets", targets)):
        if ids.size and (ids.min() < 0 or ids.max() >= num_symbols):
            raise ValueError(f"{name} must hold ids in [0, {num_symbols}), got [{ids.min()}, {ids.max()}]")
    counts = np.zeros((num_symbols, num_symbols), dtype=np.int64)
    np.add.at(counts, (inputs, targets), 1)
    return counts.argmax(axis=1)


def bigram_record(dataset) -> dict:
    """Fit the bigram model on ``dataset``'s training chunks; return a result record of its test accuracy.

    The record has the keys of a run's record that the tables read: ``label``
    (``"bigram"``), ``method``, ``dataset``, ``epsilon`` (inf: not private),
    ``rounds`` (0), ``test_accuracy`` (over every predicted position of the
    test chunks), ``wall_seconds``, ``history``.
    """
    started = time.monotonic()
    predictions = bigram_predictions(dataset.train_inputs, dataset.train_targets, num_symbols=dataset.num_classes)
    test_inputs = torch.as_tensor(dataset.test_inputs).numpy()
    test_targets = torch.as_tensor(dataset.test_targets).numpy()
    accuracy = float(np.mean(predictions[test_inputs] == test_targets))
    return {
        "label": "bigram",
        "method": "bigram",
        "noise": "none",
        "dataset": dataset.name,
        "target_epsilon": None,
        "epsilon": float("inf"),
        "rounds": 0,
        "test_accuracy": accuracy,
        "wall_seconds": round(time.monotonic() - started, 3),
        "history": [{"round": 0, "accuracy": accuracy, "loss": None, "epsilon": None, "wall_seconds": 0.0}],
    }
