"""The server's model update from a majority vote: w <- w - eta_t * vote.

Everything here is post-processing of the clients' DP releases (the vote and
its history), so no choice in this module costs privacy.
"""

from __future__ import annotations

import math

import numpy as np

LR_SCHEDULES = ("constant", "linear", "cosine", "inverse-sqrt")


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


class VoteUpdater:
    """Apply majority votes to a flat parameter vector, with optional momentum.

    Momentum keeps m <- beta * m + vote and steps w <- w - eta_t * m (the raw
    momentum, not its sign: sign(m) was measured to hurt).

    Args:
        learning_rate: eta > 0.
        schedule: one of :data:`LR_SCHEDULES`.
        momentum: beta in [0, 1).
    """

    def __init__(self, *, learning_rate: float, schedule: str = "constant", momentum: float = 0.0):
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        if not 0 <= momentum < 1:
            raise ValueError(f"server_momentum must be in [0, 1), got {momentum}")
        learning_rate_at(1, learning_rate=learning_rate, num_rounds=1, schedule=schedule)
        self.learning_rate = learning_rate
        self.schedule = schedule
        self.momentum = momentum
        self._velocity: np.ndarray | None = None

    def step(self, weights: np.ndarray, vote: np.ndarray, server_round: int, num_rounds: int) -> np.ndarray:
        """Return the new flat weights after applying ``vote`` in round ``server_round`` of ``num_rounds``."""
        if weights.shape != vote.shape:
            raise ValueError(f"vote must have shape {weights.shape}, got {vote.shape}")
        direction = vote.astype(weights.dtype)
        if self.momentum > 0:
            if self._velocity is None:
                self._velocity = np.zeros_like(weights)
            self._velocity = self.momentum * self._velocity + direction
            direction = self._velocity
        eta = learning_rate_at(
            server_round, learning_rate=self.learning_rate, num_rounds=num_rounds, schedule=self.schedule
        )
        return weights - eta * direction

    def state_dict(self) -> dict:
        """Return the momentum state (for checkpoints)."""
        return {"velocity": None if self._velocity is None else self._velocity.copy()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        velocity = state.get("velocity")
        self._velocity = None if velocity is None else np.asarray(velocity).copy()
