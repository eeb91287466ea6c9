"""One round of DP-SignSGD, the same for every driver (Flower app, drop-in helper, research loop).

- :func:`plan_release`: the one sigma planner: the noise multiplier that lets a
  client make :func:`planned_releases` releases (``num_rounds``, or fewer when
  it takes part in only some rounds) within its budget (after the releases its
  ledger already holds).
- :func:`client_round`: one client's round: check the budget, release
  (:func:`dpsign_fl.release.client_release`), record the release in the
  client's ledger, pack the signs.
- :func:`server_round`: the server's round: the majority vote of the valid
  payloads and the model update (:class:`dpsign_fl.vote.server_update.VoteUpdater`).

Drivers only move data: the Flower adapter turns messages into these calls and
results into messages; the loop calls them for every simulated client.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .vote.packing import pack_signs
from .privacy import PrivacyLedger, Release, calibrate_noise_multiplier
from .privacy.ledger import exceeds_budget
from .release import ClientMomentum, PerExampleTransform, ReleaseSettings, UnsafeRelease, client_release
from .vote.server_update import VoteUpdater
from .settings import RunSettings
from .vote import DEFAULT_VOTE, VoteCounter, VoteMemory, robust_vote


@dataclass(frozen=True)
class Budget:
    """The (epsilon, delta) a client's ledger must stay within, over every release it records."""

    target_epsilon: float
    target_delta: float


@dataclass(frozen=True)
class ReleasePlan:
    """How a client releases during one run, planned once at the run's start.

    Attributes:
        release: sample rate, clip norm, the planned noise multiplier, clipping.
        num_releases: the releases the plan allows in this run (:func:`planned_releases`).
        budget: the (epsilon, delta) the ledger must stay within.
        prior: the ledger's history when the plan was made.
    """

    release: ReleaseSettings
    num_releases: int
    budget: Budget
    prior: tuple[Release, ...] = ()

    def covers(self, ledger: PrivacyLedger) -> bool:
        """True when one more planned release provably stays within the budget, without accounting.

        The plan's sigma was calibrated so that ``prior`` followed by
        ``num_releases`` releases meets the budget, and epsilon grows with each
        release; so while the ledger holds exactly ``prior`` followed by k <
        ``num_releases`` planned releases, the next one fits. Any other history
        (another run wrote to the same ledger file) must be accounted.
        """
        history = ledger.releases
        if history[: len(self.prior)] != self.prior:
            return False
        rest = history[len(self.prior) :]
        if not rest:
            return self.num_releases >= 1
        q, sigma = self.release.sample_rate, self.release.noise_multiplier
        return len(rest) == 1 and (rest[0].sample_rate, rest[0].noise_multiplier) == (q, sigma) and rest[0].count < self.num_releases


def planned_releases(settings: RunSettings) -> int:
    """The releases a client plans for: T, or ceil(T p + z sqrt(T p (1 - p))) when it takes part in a fraction p of the rounds.

    Privacy: the count only spreads the budget; it never raises it. It is a
    plan, not a promise of the server: a client sampled more often is refused
    by its ledger once the budget is spent (:func:`client_round`).

    Args:
        settings: the run; ``num_rounds`` (T) and ``participation`` (p, in
            (0, 1], validated by :class:`RunSettings`) and
            ``participation_margin`` (z, default :data:`dpsign_fl.settings.PARTICIPATION_MARGIN`).

    Returns:
        The count, in [1, T] (a client releases at most once per round).
    """
    num_rounds, participation = settings.num_rounds, settings.participation
    if participation >= 1:
        return num_rounds
    mean = num_rounds * participation
    margin = settings.participation_margin * math.sqrt(mean * (1.0 - participation))
    return min(num_rounds, max(1, math.ceil(mean + margin)))


def least_drawn(counts, k: int, rng: np.random.Generator) -> list[int]:
    """The positions of the ``k`` smallest of ``counts`` (how often each client was drawn), ties broken at random.

    The ``balanced`` client schedule (run-config ``client-schedule``): drawing
    each round the clients drawn least often so far keeps every client's count
    within one of every other's, so a client takes part in floor or ceil of
    T K / N of T rounds and can plan for exactly that (``participation-margin``
    0). Data-independent: it reads only the counts and ``rng``.

    Raises:
        ValueError: if ``k`` is not in [0, len(counts)].
    """
    counts = np.asarray(counts, dtype=np.float64)
    if not 0 <= k <= counts.shape[0]:
        raise ValueError(f"k must be in [0, {counts.shape[0]}], got {k}")
    if k == 0:
        return []
    keys = counts + rng.random(counts.shape[0])  # counts are integers: the uniform part only orders ties
    return sorted(int(i) for i in np.argpartition(keys, k - 1)[:k])


def plan_release(settings: RunSettings, budget: Budget | None = None, prior: tuple[Release, ...] = ()) -> ReleasePlan:
    """Plan a run's releases: sigma calibrated so that ``prior`` and :func:`planned_releases` releases meet the budget.

    A client releases at most once per round, so it makes at most
    ``num_rounds`` releases, and about ``num_rounds * participation`` when it
    takes part in a fraction of the rounds; the plan covers
    :func:`planned_releases` releases of SGM(``sample_rate``, sigma) after
    ``prior`` (a durable ledger's history) within ``budget`` (default: the
    run's ``target_epsilon`` and ``target_delta``), under the run's
    accountant. No amplification from the server's choice of clients is
    assumed: a client cannot verify it, nor how often the server samples it
    (its ledger refuses any release past the budget).

    Raises:
        BudgetExhausted: if ``prior`` leaves no room for the planned releases.
        CalibrationTimeout: if calibration runs past its time bound.
    """
    budget = budget or Budget(settings.target_epsilon, settings.target_delta)
    num_releases = planned_releases(settings)
    sigma = calibrate_noise_multiplier(
        target_epsilon=budget.target_epsilon,
        target_delta=budget.target_delta,
        sample_rate=settings.sample_rate,
        num_steps=num_releases,
        accountant=settings.accountant,
        prior=[(r.sample_rate, r.noise_multiplier, r.count) for r in prior],
    )
    release = ReleaseSettings(
        sample_rate=settings.sample_rate, clip_norm=settings.clip_norm, noise_multiplier=sigma, clipping=settings.clipping,
        adversarial=settings.adversarial,
    )
    return ReleasePlan(release, num_releases, budget, tuple(prior))


def plan_for_round(plan: ReleasePlan, settings: RunSettings, server_round: int) -> ReleasePlan:
    """``plan`` with round ``server_round``'s training attack (:meth:`RunSettings.adversarial_at`); the noise is the run's."""
    adversarial = settings.adversarial_at(server_round)
    if adversarial == plan.release.adversarial:
        return plan
    return dataclasses.replace(plan, release=dataclasses.replace(plan.release, adversarial=adversarial))


@dataclass(frozen=True)
class SignedUpdate:
    """A client's release: the packed signs (already recorded in its ledger)."""

    packed: np.ndarray


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
        return refusal_reason(self.spent, self.releases, self.budget, after=self.after)


def refusal_reason(spent: float, releases: int, budget: Budget, *, after: float | None = None) -> str:
    """The one wording of a budget refusal: public numbers only (epsilon spent, releases, the budget).

    ``after`` is the epsilon one more release would reach; None when the ledger
    has no room for a whole run's plan (:class:`dpsign_fl.privacy.BudgetExhausted`).
    """
    more = f"one more would reach {after:.4f}" if after is not None else "no room for this run's releases"
    return (
        f"privacy budget exhausted: epsilon={spent:.4f} spent in {releases} releases; {more} "
        f"> epsilon {budget.target_epsilon:g} (delta={budget.target_delta:g})"
    )


@dataclass(frozen=True)
class FailedRelease:
    """A release that failed after its data was sampled; it is recorded as a release.

    Only the exception's type is kept: its message may describe the data.
    """

    error_type: str

    @property
    def reason(self) -> str:
        """A message that carries no data."""
        return "the release failed after sampling; it is counted as a release in the ledger"


def client_round(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    plan: ReleasePlan,
    ledger: PrivacyLedger,
    *,
    generator: torch.Generator,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    per_example_transform: PerExampleTransform | None = None,
    momentum: ClientMomentum | None = None,
) -> SignedUpdate | Refusal | FailedRelease:
    """Make this client's release for the current model, or refuse; record it in ``ledger``.

    Privacy: the release is one SGM(q, sigma) (:func:`client_release`); it is
    made only when the ledger, with it, stays within ``plan.budget`` (checked
    by :meth:`ReleasePlan.covers`, else by accounting the ledger), and it is
    recorded in ``ledger`` before it is returned. The caller persists the
    ledger before the packed signs leave the device. A refusal depends only on
    public numbers (q, sigma and the number of earlier releases). A failure
    after sampling (e.g. a loss that cannot be computed for a sampled
    example) is recorded as a release too and reported without its message.

    Args:
        model: the current global model.
        inputs, targets: the client's local training set.
        plan: the run's release plan (:func:`plan_release`).
        ledger: the client's ledger (updated in place).
        generator: the randomness of sampling and noise.
        loss_fn: per-batch loss.
        per_example_transform: experiments only (:func:`dpsign_fl.release.client_release`).
        momentum: None, or the client's momentum over its noisy sums (``client-momentum``;
            :mod:`dpsign_fl.release.momentum`), updated by the release only.

    Returns:
        :class:`SignedUpdate`, :class:`Refusal` or :class:`FailedRelease`.

    Raises:
        UnsafeRelease: the model holds a non-finite or huge value; raised
            before sampling and not recorded (:func:`dpsign_fl.release.check_release_model`).
    """
    release, budget = plan.release, plan.budget
    if not plan.covers(ledger):
        after = ledger.epsilon_after(
            target_delta=budget.target_delta, sample_rate=release.sample_rate, noise_multiplier=release.noise_multiplier
        )
        if exceeds_budget(after, budget.target_epsilon):
            return Refusal(ledger.epsilon(budget.target_delta), after, ledger.num_releases, budget)
    try:
        signs = client_release(
            model, inputs, targets, release, generator=generator, loss_fn=loss_fn,
            per_example_transform=per_example_transform, momentum=momentum,
        )
    except UnsafeRelease:
        raise  # refused before sampling, from the server's model alone: nothing released, nothing recorded
    except Exception as error:  # noqa: BLE001 - whatever failed, the data was sampled
        ledger.record(sample_rate=release.sample_rate, noise_multiplier=release.noise_multiplier)
        return FailedRelease(type(error).__name__)
    ledger.record(sample_rate=release.sample_rate, noise_multiplier=release.noise_multiplier)
    return SignedUpdate(pack_signs(signs))


@dataclass(frozen=True)
class ServerRoundResult:
    """The outcome of one server round.

    Attributes:
        weights: the new flat weights (the old ones when the round did not step).
        vote: the int8 vote in {-1, 0, +1}, or None when there were too few voters.
        voters: how many payloads voted.
        excluded: payload position -> why the robust vote left it out.
    """

    weights: np.ndarray
    vote: np.ndarray | None
    voters: int
    excluded: dict[int, str] = field(default_factory=dict)


def server_round(
    weights: np.ndarray,
    payloads: Iterable[np.ndarray],
    *,
    updater: VoteUpdater,
    server_round: int,
    num_rounds: int,
    min_voters: int = 1,
    vote_rule: str = DEFAULT_VOTE,
    memory: VoteMemory | None = None,
    identities: Iterable | None = None,
) -> ServerRoundResult:
    """Take the vote (robust by default, :data:`dpsign_fl.vote.DEFAULT_VOTE`) of validated packed payloads and step the model.

    Post-processing of the clients' releases: no privacy cost. With the
    majority rule the payloads are counted as they come
    (:class:`dpsign_fl.vote.VoteCounter`): extra memory is O(d) whatever their
    number, and none is unpacked. The robust rule
    (:func:`dpsign_fl.vote.robust_vote`) also reads a bounded sample of each to
    leave out the ones that look like a coordinated attack (and counts again
    only when it leaves one out); O(d) beyond the payloads, plus a 512-byte
    sketch per payload.

    Args:
        weights: the flat model the payloads were computed at.
        payloads: packed signs, each already validated.
        updater: the server update (schedule, momentum).
        server_round: the round number (1-based), for the schedule.
        num_rounds: T, the total rounds of the run, for the schedule.
        min_voters: fewer payloads leave the model unchanged.
        vote_rule: ``"robust"`` or ``"majority"`` (:data:`dpsign_fl.vote.VOTE_RULES`), as the
            run config or the strategy checked it (:func:`dpsign_fl.vote.check_vote_rule`).
        memory: the run's :class:`dpsign_fl.vote.VoteMemory` (robust rule only): each
            sender's last payload on a bounded set of blocks, to catch a client
            that repeats its own push across rounds; None = the stateless vote.
        identities: with ``memory``, the sender of each payload (client numbers, node ids);
            read after ``payloads`` is consumed, so it may be filled while they are read.

    Returns:
        :class:`ServerRoundResult`.
    """
    if vote_rule == "robust":
        rows = list(payloads)
        if len(rows) < max(min_voters, 1):
            return ServerRoundResult(weights, None, len(rows))
        outcome = robust_vote(rows, weights.shape[0], memory=memory, identities=None if identities is None else list(identities))
        new = updater.step(weights, outcome.vote, server_round, num_rounds)
        return ServerRoundResult(new, outcome.vote, len(rows), dict(outcome.dropped))
    counter = VoteCounter(weights.shape[0])
    for payload in payloads:
        counter.add(payload)
    if counter.num_voters < max(min_voters, 1):
        return ServerRoundResult(weights, None, counter.num_voters)
    vote = counter.vote()
    return ServerRoundResult(updater.step(weights, vote, server_round, num_rounds), vote, counter.num_voters)
