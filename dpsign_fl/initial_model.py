"""The server's model before round 1: drawn from ``model-seed``, then shaped by public data only.

One place for what both the Flower ServerApp and the research loop do before
the first vote:

- :func:`dpsign_fl.models.fit_public_statistics` for a model with
  public-statistics normalisation (``tanh-cnn-public-norm``), from
  :func:`dpsign_fl.data.public_images`;
- with ``pretrain-steps`` > 0, :func:`pretrain`: AdamW on the next-character loss of
  the dataset's public text (:func:`dpsign_fl.data.public_text`; for shakespeare
  the five poems, which no client holds), a fixed recipe (:data:`PRETRAIN_LEARNING_RATE`
  decaying along a half cosine, :data:`PRETRAIN_WEIGHT_DECAY`, :data:`PRETRAIN_BATCH_SIZE`),
  its batches drawn from ``model-seed``.

Privacy: neither reads any client's data; the result is the initial model, which
every client receives like any model the server sends, so the clients'
guarantee is unchanged (docs/privacy.md, "Preprocessing and features").
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .data import Dataset, public_images, public_text
from .models import build_model, fit_public_statistics, uses_public_statistics
from .settings import RunSettings
from .vote.server_update import learning_rate_at

PRETRAIN_LEARNING_RATE = 0.03
"""AdamW's first step for :func:`pretrain`; it decays along a half cosine towards 0 over the steps. Chosen on
the poems alone (trained on their first 90 % of chunks, validated on the rest; docs/results.md): 0.003 /
0.012 / 0.03 / 0.05 / 0.08 gave 45.8 (constant step, no decay) / 48.4 / 49.5 / 49.8 / 49.5 %; 0.03 is
within 0.3 points of the best and further from 0.08, which was unstable early on."""

PRETRAIN_WEIGHT_DECAY = 0.1
"""AdamW's decoupled weight decay: the poems are only 2,519 chunks."""

PRETRAIN_BATCH_SIZE = 32
"""Chunks per pretraining step."""

_LOG = logging.getLogger(__name__)


def initial_model(
    run: RunSettings, dataset: Dataset, *, log: Callable[[str], None] | None = None, with_pretraining: bool = True
) -> nn.Module:
    """Return the run's initial global model (module docstring).

    Args:
        run: the run's settings (model, ``model-seed``, ``pretrain-steps``, ``data-dir``).
        dataset: the loaded dataset (its input shape and number of classes).
        log: called with a progress line now and then during pretraining; None logs at INFO.
        with_pretraining: False skips ``pretrain-steps`` (a run resumed from a
            checkpoint, whose weights replace the model's).

    Raises:
        ValueError: if the model does not fit the dataset, or its public data is missing.
    """
    model = build_model(
        run.model_name, input_shape=tuple(dataset.input_shape), num_classes=dataset.num_classes, seed=run.model_seed,
        **run.model_options,
    )
    if uses_public_statistics(model):
        fit_public_statistics(model, public_images(run.dataset, run.data_dir))
    if run.pretrain_steps and with_pretraining:
        pretrain(model, public_text(run.dataset, run.data_dir), steps=run.pretrain_steps, seed=run.model_seed, log=log)
    return model


def pretrain(
    model: nn.Module,
    chunks: torch.Tensor,
    *,
    steps: int,
    seed: int,
    log: Callable[[str], None] | None = None,
    learning_rate: float = PRETRAIN_LEARNING_RATE,
    weight_decay: float = PRETRAIN_WEIGHT_DECAY,
    schedule: str = "cosine",
) -> None:
    """Train a sequence model in place on public chunks: ``steps`` AdamW steps on the next-character loss.

    The step follows ``schedule`` (one of the server's, e.g. a half cosine from
    ``learning_rate`` towards 0), with decoupled weight decay ``weight_decay``;
    the defaults are the recipe that ``pretrain-steps`` runs (other values: for
    ``scripts/pretrain_sweep.py``). Each step draws :data:`PRETRAIN_BATCH_SIZE`
    chunks uniformly with a private generator seeded with ``seed``; the model
    reads positions 0..T-1 of a chunk and predicts 1..T, as in the clients'
    examples. Deterministic for a seed and a thread count.

    Privacy: ``chunks`` must be public (never a client's examples).

    Raises:
        ValueError: for ``steps`` < 1, or chunks that are not a non-empty ``[N, T + 1]`` id tensor.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if chunks.ndim != 2 or chunks.shape[0] == 0 or chunks.shape[1] < 2 or chunks.dtype != torch.int64:
        raise ValueError(f"chunks must be a non-empty int64 [N, T + 1] tensor, got {chunks.dtype} {list(chunks.shape)}")
    log = log or _LOG.info
    generator = torch.Generator().manual_seed(int(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    was_training = model.training
    model.train()
    start, every = time.monotonic(), max(1, steps // 5)
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, learning_rate=learning_rate, num_rounds=steps, schedule=schedule)
        batch = chunks[torch.randint(0, chunks.shape[0], (PRETRAIN_BATCH_SIZE,), generator=generator)]
        loss = F.cross_entropy(model(batch[:, :-1]), batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            log(f"pretraining on the public text: step {step}/{steps}, loss {loss.item():.3f}, {time.monotonic() - start:.0f} s")
    model.train(was_training)
    model.zero_grad(set_to_none=True)
