"""SignMajorityVote: Flower strategy for DP-SignSGD with majority vote.

Used like ``FedAvg`` in a ServerApp. Differences: each client replies with its
bit-packed signs (see :mod:`dpsign_fl.flower.records`), the server takes the
coordinate-wise majority vote and steps ``w <- w - eta_t * vote`` (optionally
with server momentum). Only the train aggregation and the train configuration
differ from ``FedAvg``, plus the round numbering of a resumed run.

Faults: a client that raises, refuses or does not reply within the round's
timeout is left out of that round's vote; the round still updates the model
while at least ``min_train_nodes`` valid replies arrived, and leaves it
unchanged otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from ..server_update import VoteUpdater
from ..vote import majority_vote
from .records import InvalidReply, arrays_to_flat, flat_to_arrays, num_coordinates, parse_train_reply


class SignMajorityVote(FedAvg):
    """Majority vote of clients' DP-SIGN bits, with a learning-rate schedule and momentum.

    Args:
        fraction_train: fraction of connected nodes sampled per round.
        fraction_evaluate: fraction for client-side evaluation; 0 by default
            because a client's evaluation on its own data is not covered by
            the DP guarantee. Evaluate on the server instead (``evaluate_fn``).
        min_train_nodes, min_evaluate_nodes, min_available_nodes: as in FedAvg.
        learning_rate: eta > 0, the step per vote.
        lr_schedule: ``"constant"``, ``"linear"``, ``"cosine"`` or ``"inverse-sqrt"``.
        server_momentum: beta in [0, 1); post-processing, free of privacy cost.
        num_rounds: T for the schedule; None = the ``num_rounds`` given to
            :meth:`start` (only matters for a decaying schedule).
        arrayrecord_key, configrecord_key: record keys, as in FedAvg.

    After each round ``round_metrics[round]`` holds ``voters`` (valid replies),
    ``dropped`` (error and invalid replies), ``missing`` (sampled nodes that did
    not reply before the timeout), ``epsilon`` (largest epsilon spent among the
    clients that replied), ``uplink-bytes`` (serialised sign payloads received)
    and ``payload-bytes`` (ceil(d/8)). ``epsilon_seen`` maps each node id to the
    largest epsilon it reported; a node whose epsilon goes down (its ledger was
    reset) is logged as a warning.
    """

    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 0,
        min_available_nodes: int = 2,
        learning_rate: float = 0.01,
        lr_schedule: str = "constant",
        server_momentum: float = 0.0,
        num_rounds: int | None = None,
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
        )
        self.learning_rate = learning_rate
        self.lr_schedule = lr_schedule
        self.server_momentum = server_momentum
        self.num_rounds = num_rounds
        self.updater = VoteUpdater(
            learning_rate=learning_rate, num_rounds=num_rounds or 1, schedule=lr_schedule, momentum=server_momentum
        )
        self.round_metrics: dict[int, dict[str, float | int]] = {}
        self.epsilon_seen: dict[int, float] = {}
        self.round_offset = 0
        self._current_arrays: ArrayRecord | None = None
        self._sampled = 0

    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        log(
            INFO,
            "\t└──> Majority vote: learning rate %g (%s), server momentum %g",
            self.learning_rate,
            self.lr_schedule,
            self.server_momentum,
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600.0,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
    ) -> Result:
        """Run rounds ``first_round .. first_round + num_rounds - 1`` (as ``Strategy.start``).

        ``Strategy.start`` counts rounds from 1; a resumed run passes the round
        after its checkpoint as ``first_round``, and every method below, the
        clients (``server-round``) and ``evaluate_fn`` see the true round number
        (Flower's own "[ROUND i/n]" log lines keep counting from 1). The
        schedule spans ``first_round - 1 + num_rounds`` rounds unless
        ``num_rounds`` was given to the constructor.

        Raises:
            ValueError: if ``first_round`` < 1.
        """
        if first_round < 1:
            raise ValueError(f"first_round must be >= 1, got {first_round}")
        self.round_offset = first_round - 1
        if self.num_rounds is None:
            self.updater.num_rounds = self.round_offset + num_rounds
        shifted_fn = None
        if evaluate_fn is not None:

            def shifted_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
                return evaluate_fn(server_round + self.round_offset, arrays)

        return super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, shifted_fn)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes as FedAvg does and remember the model the votes will move."""
        self._current_arrays = arrays
        messages = list(super().configure_train(server_round + self.round_offset, arrays, config, grid))
        self._sampled = len(messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As FedAvg, with the true round number."""
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """As FedAvg, with the true round number."""
        return super().aggregate_evaluate(server_round + self.round_offset, replies)

    def state_dict(self) -> dict:
        """Return the state a checkpoint needs: the updater's momentum and ``epsilon_seen``."""
        return {"updater": self.updater.state_dict(), "epsilon-seen": dict(self.epsilon_seen)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the state saved by :meth:`state_dict` (node ids may come as strings)."""
        self.updater.load_state_dict(state["updater"])
        self.epsilon_seen = {int(node): float(eps) for node, eps in state["epsilon-seen"].items()}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, take the majority vote and step the model.

        A reply with an error (a client that raised or refused), that breaks
        the wire format, or that is a second reply of the same node is dropped
        with a logged reason; the others still count. With fewer than
        ``min_train_nodes`` valid replies the model is left unchanged (``None``
        is returned for the arrays).
        """
        if self._current_arrays is None:
            raise RuntimeError("aggregate_train called before configure_train")
        server_round += self.round_offset
        d = num_coordinates(self._current_arrays)
        packed, epsilons, uplink_bytes, received = self._valid_replies(server_round, replies, d)
        missing = max(self._sampled - received, 0)
        if missing:
            log(WARNING, "round %d: %d of %d sampled nodes did not reply in time", server_round, missing, self._sampled)
        metrics = {
            "voters": len(packed),
            "dropped": received - len(packed),
            "missing": missing,
            "epsilon": max(epsilons) if epsilons else 0.0,
            "uplink-bytes": uplink_bytes,
            "payload-bytes": (d + 7) // 8,
        }
        self.round_metrics[server_round] = metrics
        if len(packed) < max(self.min_train_nodes, 1):
            log(
                WARNING,
                "round %d: %d valid replies, fewer than min-train-nodes=%d; the model is unchanged",
                server_round,
                len(packed),
                self.min_train_nodes,
            )
            return None, MetricRecord(metrics)
        vote = majority_vote(np.stack(packed), d)
        weights = arrays_to_flat(self._current_arrays)
        updated = self.updater.step(weights, vote, server_round)
        return flat_to_arrays(updated, self._current_arrays), MetricRecord(metrics)

    def _valid_replies(
        self, server_round: int, replies: Iterable[Message], d: int
    ) -> tuple[list[np.ndarray], list[float], int, int]:
        """Return (packed signs, epsilons, payload bytes) of the valid replies, and the count received."""
        packed, epsilons, uplink_bytes, received, voted = [], [], 0, 0, set()
        for message in replies:
            received += 1
            node = message.metadata.src_node_id
            if message.has_error():
                reason = _last_line(message.error.reason)
                code = message.error.code
                log(WARNING, "round %d: dropped reply of node %s: error %s: %s", server_round, node, code, reason)
                continue
            if node in voted:  # one node, one vote: a repeated reply could outvote honest nodes
                log(WARNING, "round %d: dropped reply of node %s: a second reply in the same round", server_round, node)
                continue
            try:
                signs, _, epsilon, size = parse_train_reply(message.content, d)
            except InvalidReply as error:
                log(WARNING, "round %d: dropped reply of node %s: %s", server_round, node, error)
                continue
            voted.add(node)
            self._note_epsilon(server_round, node, epsilon)
            packed.append(signs)
            epsilons.append(epsilon)
            uplink_bytes += size
        return packed, epsilons, uplink_bytes, received

    def _note_epsilon(self, server_round: int, node: int, epsilon: float) -> None:
        """Keep the largest epsilon per node; warn when a node's epsilon goes down.

        A client's epsilon spent never decreases while its ledger persists; a
        smaller value means its ledger was reset (e.g. a new simulation run
        after a resume), so its true privacy loss is larger than it reports.
        """
        before = self.epsilon_seen.get(node)
        if before is not None and epsilon < before - 1e-9:
            log(
                WARNING,
                "round %d: node %s reports epsilon %.4f, below the %.4f it reported before: its privacy ledger was reset",
                server_round,
                node,
                epsilon,
                before,
            )
        self.epsilon_seen[node] = max(epsilon, before or 0.0)


def _last_line(reason: str, limit: int = 300) -> str:
    """The last non-empty line of an error reason (in simulation a whole Ray traceback), shortened."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."
