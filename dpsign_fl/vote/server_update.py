"""The server's model update from a majority vote: w <- w - eta_t * vote.

Everything here is post-processing of the clients' DP releases (the vote and
its history), so no choice in this module costs privacy.
"""

from __future__ import annotations

import math

import numpy as np

LR_SCHEDULES = ("constant", "linear", "cosine", "inverse-sqrt")
AUTOMATIC = 0.0
"""The learning rate that asks for automatic steps (:class:`VoteUpdater`): nothing to tune."""
AGREEMENT_DECAY = 0.9
"""beta of the automatic steps: the memory of the running agreement between consecutive votes."""
AGREEMENT_STEP = 1.0
"""c of the automatic steps: the step on a coordinate whose votes always agree, in units of the step scale."""
FLOOR_STEP = 0.02
"""The step of a coordinate whose votes agree no more than chance, in units of the step scale."""


def learning_rate_at(server_round: int, *, learning_rate: float, num_rounds: int, schedule: str = "constant") -> float:
    """Return eta_t for round ``server_round`` (1-based) of ``num_rounds``.

    ``"linear"`` decays from eta to eta/num_rounds; ``"cosine"`` follows a half
    cosine from eta towards 0 (never reaching it); ``"inverse-sqrt"`` is
    eta/sqrt(t) (measured to decay too fast here: docs/results.md). Rounds past
    ``num_rounds`` keep the value of the last round.

    Raises:
        ValueError: on an unknown schedule or a round < 1.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if server_round < 1:
        raise ValueError(f"server_round must be >= 1, got {server_round}")
    num_rounds = max(int(num_rounds), 1)
    progress = (min(server_round, num_rounds) - 1) / num_rounds
    if schedule == "constant":
        return learning_rate
    if schedule == "linear":
        return learning_rate * (1.0 - progress)
    if schedule == "cosine":
        return learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    return learning_rate / math.sqrt(server_round)


def initial_step_scale(weights: np.ndarray) -> float:
    """The step scale of the automatic steps: the root mean square of the initial weights.

    Computed once, by the server, from the model it starts with (data-free);
    clients get the number with the update rule, so both sides step alike.
    A model that starts at all zeros gets 1e-3.
    """
    weights = np.asarray(weights, dtype=np.float64)
    rms = float(np.sqrt(np.mean(np.square(weights)))) if weights.size else 0.0
    return rms if rms > 0 and np.isfinite(rms) else 1e-3


class VoteUpdater:
    """Apply majority votes to a flat parameter vector: a learning rate and momentum, or automatic steps.

    With a learning rate eta > 0: momentum keeps m <- beta * m + vote and steps
    w <- w - eta_t * m (the raw momentum, not its sign: sign(m) was measured to hurt).

    With ``learning_rate = AUTOMATIC`` (0) there is no learning rate to choose:
    every coordinate keeps the running agreement of its consecutive votes,
    a <- b a + (1 - b) v_t v_{t-1} (about (2p - 1)^2 for a coordinate whose vote
    is right with probability p), and steps w <- w - s (c sqrt(max(a, 0)) + f) v_t,
    with s the step scale (:func:`initial_step_scale`), b, c, f
    (:data:`AGREEMENT_DECAY`, :data:`AGREEMENT_STEP`, :data:`FLOOR_STEP`)
    fixed, times the schedule's factor. Coordinates whose votes keep agreeing
    move fast; those whose votes are coin flips (DP noise) move slowly. Every
    operation is element-wise float32, so a client replaying the votes gets the
    same bytes.

    Args:
        learning_rate: eta > 0, or :data:`AUTOMATIC`.
        schedule: one of :data:`LR_SCHEDULES`.
        momentum: beta in [0, 1); must be 0 with automatic steps.
        step_scale: s of the automatic steps; None = set by :meth:`start`.
    """

    def __init__(
        self, *, learning_rate: float, schedule: str = "constant", momentum: float = 0.0, step_scale: float | None = None
    ):
        if not learning_rate >= 0:
            raise ValueError(f"learning_rate must be > 0, or 0 for automatic steps, got {learning_rate}")
        if not 0 <= momentum < 1:
            raise ValueError(f"server_momentum must be in [0, 1), got {momentum}")
        if learning_rate == AUTOMATIC and momentum > 0:
            raise ValueError(f"server_momentum must be 0 with automatic steps (learning_rate 0), got {momentum}")
        if step_scale is not None and not step_scale > 0:
            raise ValueError(f"step_scale must be > 0, got {step_scale}")
        learning_rate_at(1, learning_rate=1.0, num_rounds=1, schedule=schedule)
        self.learning_rate = learning_rate
        self.schedule = schedule
        self.momentum = momentum
        self.step_scale = step_scale
        self._update_state: np.ndarray | None = None

    @property
    def automatic(self) -> bool:
        """True when the steps come from the votes' agreement, not from a learning rate."""
        return self.learning_rate == AUTOMATIC

    def start(self, weights: np.ndarray) -> None:
        """Fix the step scale of automatic steps from the initial weights (kept if already set)."""
        if self.automatic and self.step_scale is None:
            self.step_scale = initial_step_scale(weights)

    def step(self, weights: np.ndarray, vote: np.ndarray, server_round: int, num_rounds: int) -> np.ndarray:
        """Return the new flat weights after applying ``vote`` in round ``server_round`` of ``num_rounds``."""
        if weights.shape != vote.shape:
            raise ValueError(f"vote must have shape {weights.shape}, got {vote.shape}")
        direction = vote.astype(weights.dtype)
        if self.automatic:
            return self._automatic_step(weights, direction, server_round, num_rounds)
        if self.momentum > 0:
            if self._update_state is None:
                self._update_state = np.zeros_like(weights)
            self._update_state = self.momentum * self._update_state + direction
            direction = self._update_state
        eta = learning_rate_at(
            server_round, learning_rate=self.learning_rate, num_rounds=num_rounds, schedule=self.schedule
        )
        return weights - eta * direction

    def _automatic_step(self, weights: np.ndarray, direction: np.ndarray, server_round: int, num_rounds: int) -> np.ndarray:
        if self.step_scale is None:
            raise RuntimeError("automatic steps need a step scale: call start(initial weights) first")
        d = weights.shape[0]
        if self._update_state is None:
            self._update_state = np.zeros(2 * d, dtype=weights.dtype)
        agreement, previous = self._update_state[:d], self._update_state[d:]
        dtype = weights.dtype.type
        agreement *= dtype(AGREEMENT_DECAY)
        agreement += dtype(1 - AGREEMENT_DECAY) * (direction * previous)
        previous[:] = direction
        factor = learning_rate_at(server_round, learning_rate=1.0, num_rounds=num_rounds, schedule=self.schedule)
        steps = np.sqrt(np.maximum(agreement, dtype(0))) * dtype(AGREEMENT_STEP) + dtype(FLOOR_STEP)
        steps *= dtype(self.step_scale * factor)
        return weights - steps * direction

    def state_dict(self) -> dict:
        """Return the state (for checkpoints and replicas).

        ``update-state``: the momentum ``[d]``, or with automatic steps the running
        agreement and the last vote ``[2 d]``; ``step-scale``: s (None unless automatic).
        """
        return {"update-state": None if self._update_state is None else self._update_state.copy(), "step-scale": self.step_scale}

    def load_state_dict(self, state: dict) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        update_state = state.get("update-state")
        self._update_state = None if update_state is None else np.asarray(update_state).copy()
        if state.get("step-scale") is not None:
            self.step_scale = float(state["step-scale"])
