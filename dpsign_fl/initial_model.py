"""The server's model before round 1: drawn from ``model-seed``, then shaped by public data only.

One place for what both the Flower ServerApp and the research loop do before
the first vote:

- :func:`dpsign_fl.models.fit_public_statistics` for a model with
  public-statistics normalisation (``tanh-cnn-public-norm``), from
  :func:`dpsign_fl.data.public_images`;
- with ``pretrain-steps`` > 0, :func:`pretrain`: AdamW on the dataset's public
  pretraining set (:func:`dpsign_fl.data.pretraining_set`: for shakespeare the
  five poems, which no client holds; for mnist scikit-learn's digits), by the
  dataset's fixed recipe (:data:`PRETRAIN_RECIPES`), its batches drawn from
  ``model-seed``; a run with ``adversarial-training`` pretrains at the same
  attack's adversarial copies.

Privacy: neither reads any client's data; the result is the initial model, which
every client receives like any model the server sends, so the clients'
guarantee is unchanged (docs/privacy.md, "Preprocessing and features").
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .data import Dataset, pretraining_set, public_images
from .models import build_model, fit_public_statistics, uses_public_statistics
from .release.adversarial import AdversarialSettings, adversarial_examples
from .settings import RunSettings
from .vote.server_update import learning_rate_at


@dataclass(frozen=True)
class PretrainRecipe:
    """How :func:`pretrain` trains: AdamW, its first step following ``schedule`` over the steps.

    Attributes:
        learning_rate: AdamW's first step.
        weight_decay: AdamW's decoupled weight decay.
        schedule: one of the server's schedules (``"cosine"``: a half cosine towards 0).
        batch_size: examples drawn (uniformly, with replacement) per step.
        max_shift: images only: each batch is rolled by up to this many pixels along each axis (0: none).
    """

    learning_rate: float
    weight_decay: float
    schedule: str
    batch_size: int
    max_shift: int = 0


PRETRAIN_RECIPES = {
    "shakespeare": PretrainRecipe(learning_rate=0.03, weight_decay=0.1, schedule="cosine", batch_size=32),
    "mnist": PretrainRecipe(learning_rate=1e-3, weight_decay=0.0, schedule="constant", batch_size=64, max_shift=2),
}
"""Per dataset, the recipe of ``pretrain-steps``. shakespeare: chosen on the poems alone (trained on their first
90 % of chunks, validated on the rest; docs/results.md): a first step of 0.003 / 0.012 / 0.03 / 0.05 / 0.08 gave
45.8 (constant, no decay) / 48.4 / 49.5 / 49.8 / 49.5 %, 0.03 within 0.3 points of the best and further from 0.08,
which was unstable early on; weight decay 0.1 as the poems are only 2,519 chunks. mnist: not tuned, the first
recipe tried (Adam's usual step; the 1,797 digits shifted by up to 2 pixels against over-fitting)."""

PRETRAIN_ADVERSARIAL_WARMUP = 0.3
"""With an attack, :func:`pretrain` grows its radius linearly over this share of the steps, then keeps it."""

_LOG = logging.getLogger(__name__)


def initial_model(
    run: RunSettings, dataset: Dataset, *, log: Callable[[str], None] | None = None, with_pretraining: bool = True
) -> nn.Module:
    """Return the run's initial global model (module docstring).

    Args:
        run: the run's settings (model, ``model-seed``, ``pretrain-steps``, ``data-dir``, the training attack).
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
        inputs, targets = pretraining_set(run.dataset, run.data_dir)
        pretrain(
            model, inputs, targets, steps=run.pretrain_steps, seed=run.model_seed, recipe=PRETRAIN_RECIPES[run.dataset],
            attack=run.adversarial, log=log,
        )
    return model


def pretrain(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int,
    seed: int,
    recipe: PretrainRecipe,
    attack: AdversarialSettings | None = None,
    log: Callable[[str], None] | None = None,
) -> None:
    """Train ``model`` in place on public examples: ``steps`` AdamW steps of ``recipe`` on the cross-entropy.

    Each step draws ``recipe.batch_size`` examples uniformly with a private
    generator seeded with ``seed`` (rolled by up to ``recipe.max_shift``
    pixels, for images); with ``attack``, the model trains at their
    adversarial copies (:func:`dpsign_fl.release.adversarial.adversarial_examples`),
    the radius growing over the first :data:`PRETRAIN_ADVERSARIAL_WARMUP` of
    the steps. Text: ``inputs`` are chunks of T character ids and ``targets``
    their next characters, as in the clients' examples. Deterministic for a
    seed and a thread count.

    Privacy: ``inputs`` must be public (never a client's examples).

    Raises:
        ValueError: for ``steps`` < 1, or inputs and targets that are empty or of different lengths.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if inputs.shape[0] == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets must be non-empty and as many, got {list(inputs.shape)} and {list(targets.shape)}"
        )
    log = log or _LOG.info
    generator = torch.Generator().manual_seed(int(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    was_training = model.training
    model.train()
    start, every = time.monotonic(), max(1, steps // 5)
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, learning_rate=recipe.learning_rate, num_rounds=steps, schedule=recipe.schedule)
        index = torch.randint(0, inputs.shape[0], (recipe.batch_size,), generator=generator)
        batch, batch_targets = inputs[index], targets[index]
        if recipe.max_shift:
            shifts = torch.randint(-recipe.max_shift, recipe.max_shift + 1, (2,), generator=generator).tolist()
            batch = torch.roll(batch, shifts=shifts, dims=(-2, -1))
        if attack is not None:
            share = min(1.0, step / (PRETRAIN_ADVERSARIAL_WARMUP * steps))
            radius = dataclasses.replace(attack, epsilon=attack.epsilon * share)
            batch = adversarial_examples(model, F.cross_entropy, batch, batch_targets, radius, generator=generator)
        loss = F.cross_entropy(model(batch), batch_targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            log(f"pretraining on the public set: step {step}/{steps}, loss {loss.item():.3f}, {time.monotonic() - start:.0f} s")
    model.train(was_training)
    model.zero_grad(set_to_none=True)
