"""One round of DP-SignSGD, the same for every driver (Flower app, drop-in helper, research loop).

- :func:`plan_release`: the one sigma planner: the noise multiplier that lets a
  client make ``num_rounds`` releases within its budget.
- :func:`client_round`: one client's round: check the budget, release
  (:func:`dpsign_fl.release.client_release`), record the release in the
  client's ledger, pack the signs.
- :func:`server_round`: the server's round: the majority vote of the valid
  payloads and the model update (:class:`dpsign_fl.server_update.VoteUpdater`).

Drivers only move data: the Flower adapter turns messages into these calls and
results into messages; the loop calls them for every simulated client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .packing import pack_signs
from .privacy import PrivacyLedger, calibrate_noise_multiplier
from .release import ReleaseSettings, client_release
from .server_update import VoteUpdater
from .settings import RunSettings
from .vote import VoteCounter


def plan_release(settings: RunSettings) -> ReleaseSettings:
    """Return the release settings of a run: sigma calibrated for ``num_rounds`` releases.

    A client releases at most once per round, so ``num_rounds`` releases of
    SGM(``sample_rate``, sigma) must meet (``target_epsilon``, ``target_delta``)
    under ``accountant``. No amplification from the server's choice of
    clients is assumed: a client cannot verify it.
    """
    sigma = calibrate_noise_multiplier(
        target_epsilon=settings.target_epsilon,
        target_delta=settings.target_delta,
        sample_rate=settings.sample_rate,
        num_steps=settings.num_rounds,
        accountant=settings.accountant,
    )
    return ReleaseSettings(
        sample_rate=settings.sample_rate,
        clip_norm=settings.clip_norm,
        noise_multiplier=sigma,
        clipping=settings.clipping,
    )


@dataclass(frozen=True)
class Budget:
    """The (epsilon, delta) a client's ledger must stay within."""

    target_epsilon: float
    target_delta: float


@dataclass(frozen=True)
class SignedUpdate:
    """A client's release: the packed signs and the epsilon spent once they are sent."""

    packed: np.ndarray
    epsilon: float


@dataclass(frozen=True)
class Refusal:
    """A client's refusal to release: one more release would exceed its budget.

    Attributes:
        spent: epsilon spent so far, at the budget's delta.
        after: epsilon after one more release.
        releases: releases recorded so far.
        budget: the budget that would be exceeded.
    """

    spent: float
    after: float
    releases: int
    budget: Budget

    @property
    def reason(self) -> str:
        """A message for logs and the error reply (public numbers only)."""
        return (
            f"privacy budget exhausted: epsilon={self.spent:.4f} spent in {self.releases} releases; one more "
            f"would reach {self.after:.4f} > target-epsilon={self.budget.target_epsilon:g} "
            f"(delta={self.budget.target_delta:g})"
        )


def client_round(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    release: ReleaseSettings,
    ledger: PrivacyLedger,
    budget: Budget,
    *,
    generator: torch.Generator,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    gradient_noise: str = "none",
) -> SignedUpdate | Refusal:
    """Make this client's release for the current model, or refuse; record it in ``ledger``.

    Privacy: the release is one SGM(q, sigma) (:func:`client_release`); it is
    made only when the ledger, with it, stays within ``budget``, and it is
    recorded in ``ledger`` before it is returned. The caller persists the
    ledger before the packed signs leave the device. A refusal depends only on
    public numbers (q, sigma and the number of earlier releases).

    Args:
        model: the current global model.
        inputs, targets: the client's local training set.
        release: sample rate, clip norm, noise multiplier, clipping.
        ledger: the client's ledger (updated in place).
        budget: the (epsilon, delta) the ledger must stay within.
        generator: the randomness of sampling and noise.
        loss_fn: per-batch loss.
        gradient_noise: experiments only (:mod:`dpsign_fl.gradient_noise`).

    Returns:
        :class:`SignedUpdate` or :class:`Refusal`.
    """
    after = ledger.epsilon_after(
        target_delta=budget.target_delta, sample_rate=release.sample_rate, noise_multiplier=release.noise_multiplier
    )
    if not after <= budget.target_epsilon:
        return Refusal(ledger.epsilon(budget.target_delta), after, ledger.num_releases, budget)
    signs = client_release(
        model, inputs, targets, release, generator=generator, loss_fn=loss_fn, gradient_noise=gradient_noise
    )
    ledger.record(sample_rate=release.sample_rate, noise_multiplier=release.noise_multiplier)
    return SignedUpdate(pack_signs(signs), after)


@dataclass(frozen=True)
class ServerRoundResult:
    """The outcome of one server round.

    Attributes:
        weights: the new flat weights (the old ones when the round did not step).
        vote: the int8 vote in {-1, 0, +1}, or None when there were too few voters.
        voters: how many payloads voted.
    """

    weights: np.ndarray
    vote: np.ndarray | None
    voters: int


def server_round(
    weights: np.ndarray,
    payloads: Iterable[np.ndarray],
    *,
    updater: VoteUpdater,
    server_round: int,
    num_rounds: int,
    min_voters: int = 1,
) -> ServerRoundResult:
    """Take the majority vote of validated packed payloads and step the model.

    Post-processing of the clients' releases: no privacy cost. The payloads are
    counted as they come (:class:`dpsign_fl.vote.VoteCounter`): extra memory is
    O(d) whatever their number, and none is unpacked.

    Args:
        weights: the flat model the payloads were computed at.
        payloads: packed signs, each already validated.
        updater: the server update (schedule, momentum).
        server_round: the round number (1-based), for the schedule.
        num_rounds: T, the total rounds of the run, for the schedule.
        min_voters: fewer payloads leave the model unchanged.

    Returns:
        :class:`ServerRoundResult`.
    """
    counter = VoteCounter(weights.shape[0])
    for payload in payloads:
        counter.add(payload)
    if counter.num_voters < max(min_voters, 1):
        return ServerRoundResult(weights, None, counter.num_voters)
    vote = counter.vote()
    return ServerRoundResult(updater.step(weights, vote, server_round, num_rounds), vote, counter.num_voters)
