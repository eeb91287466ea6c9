"""SignMajorityVote: the Flower strategy of DP-SignSGD with majority vote.

Used like ``FedAvg`` in a ServerApp: ``strategy.start(grid=..., initial_arrays=...,
num_rounds=...)``. Each sampled client replies with its bit-packed DP-SIGN signs
(:mod:`dpsign_fl.flower.records`); the server takes the coordinate-wise
majority vote and steps ``w <- w - eta_t * vote`` (optionally with server
momentum), through the same server round as the research loop
(:func:`dpsign_fl.rounds.server_round`).

It has its own round loop (``start``) rather than ``Strategy.start``: round
numbers stay true when a run resumes, and each round's train metrics reach the
caller's ``round_end_fn`` as an argument.

Faults: a reply with an error (the client raised or refused), one that breaks
the wire format, a second reply of one node, or a reply from a node that was
not sampled this round is dropped with a logged reason; the round still steps
while at least ``min_train_nodes`` valid replies arrived, and leaves the model
unchanged otherwise. Client-side evaluation is not offered: a client's
accuracy on its own data is not covered by the DP guarantee (evaluate on the
server with ``evaluate_fn``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from ..rounds import server_round as run_server_round
from ..server_update import VoteUpdater
from .records import (
    ARRAYS_KEY,
    CONFIG_KEY,
    ROUND_KEY,
    InvalidReply,
    arrays_to_flat,
    flat_to_arrays,
    num_coordinates,
    parse_train_reply,
)

RoundEndFn = Callable[[int, ArrayRecord, MetricRecord, "MetricRecord | None"], None]


class SignMajorityVote(Strategy):
    """Majority vote of clients' DP-SIGN bits, with a learning-rate schedule and momentum.

    Args:
        fraction_train: fraction of connected nodes sampled per round, in (0, 1].
        min_train_nodes: fewest valid replies that move the model (and fewest
            nodes sampled), >= 1.
        min_available_nodes: nodes to wait for before sampling, >= 1.
        learning_rate: eta > 0, the step per vote.
        lr_schedule: ``"constant"``, ``"linear"``, ``"cosine"`` or ``"inverse-sqrt"``.
        server_momentum: beta in [0, 1); post-processing, free of privacy cost.

    Each round's :class:`MetricRecord` (returned by :meth:`aggregate_train`, kept
    in ``Result.train_metrics_clientapp``) holds ``voters`` (valid replies),
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
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        learning_rate: float = 0.01,
        lr_schedule: str = "constant",
        server_momentum: float = 0.0,
    ) -> None:
        if not 0 < fraction_train <= 1:
            raise ValueError(f"fraction_train must be in (0, 1], got {fraction_train}")
        for name, value in (("min_train_nodes", min_train_nodes), ("min_available_nodes", min_available_nodes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.updater = VoteUpdater(learning_rate=learning_rate, schedule=lr_schedule, momentum=server_momentum)
        self.num_rounds = 1
        self.epsilon_seen: dict[int, float] = {}
        self._current_arrays: ArrayRecord | None = None
        self._sampled: set[int] = set()

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t├── Sampling: fraction %g of connected nodes per round, at least %d (waits for %d)",
            self.fraction_train, self.min_train_nodes, self.min_available_nodes)
        log(INFO, "\t└── Majority vote of packed signs: learning rate %g (%s), server momentum %g",
            self.updater.learning_rate, self.updater.schedule, self.updater.momentum)

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
        round_end_fn: RoundEndFn | None = None,
    ) -> Result:
        """Run rounds ``first_round`` .. ``num_rounds`` and return Flower's ``Result``.

        ``num_rounds`` is T, the last round of the run (a resumed run passes the
        round after its checkpoint as ``first_round`` and the same T); the
        learning-rate schedule spans T rounds. ``evaluate_fn(round, arrays)`` is
        called for the model before ``first_round`` and after every round, as in
        ``Strategy.start``; ``round_end_fn(round, arrays, train_metrics,
        evaluate_metrics)`` after that, with the round's train metrics.
        ``evaluate_config`` is accepted for compatibility and unused.

        Raises:
            ValueError: if ``first_round`` is not in [1, num_rounds + 1].
        """
        if not 1 <= first_round <= num_rounds + 1:
            raise ValueError(f"first_round must be in [1, {num_rounds + 1}], got {first_round}")
        self.num_rounds = num_rounds
        log(INFO, "Starting %s, rounds %d to %d:", type(self).__name__, first_round, num_rounds)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        result = Result(arrays=initial_arrays)
        started = time.monotonic()
        if evaluate_fn is not None:
            metrics = evaluate_fn(first_round - 1, initial_arrays)
            if metrics is not None:
                result.evaluate_metrics_serverapp[first_round - 1] = metrics
        arrays = initial_arrays
        for current in range(first_round, num_rounds + 1):
            log(INFO, "[ROUND %d/%d]", current, num_rounds)
            replies = grid.send_and_receive(self.configure_train(current, arrays, train_config, grid), timeout=timeout)
            updated, train_metrics = self.aggregate_train(current, replies)
            if updated is not None:
                arrays = updated
            result.arrays = arrays
            result.train_metrics_clientapp[current] = train_metrics
            evaluate_metrics = evaluate_fn(current, arrays) if evaluate_fn is not None else None
            if evaluate_metrics is not None:
                result.evaluate_metrics_serverapp[current] = evaluate_metrics
            if round_end_fn is not None:
                round_end_fn(current, arrays, train_metrics, evaluate_metrics)
        log(INFO, "%s finished rounds %d to %d in %.1f s", type(self).__name__, first_round, num_rounds,
            time.monotonic() - started)
        return result

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and send each the model and the round number."""
        available = len(list(grid.get_node_ids()))
        sample_size = max(int(available * self.fraction_train), self.min_train_nodes)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, sample_size)
        log(INFO, "round %d: sampled %d of %d nodes", server_round, len(node_ids), available)
        self._current_arrays = arrays
        self._sampled = set(node_ids)
        round_config = ConfigRecord({**dict(config), ROUND_KEY: server_round})
        content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: round_config})
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node) for node in node_ids]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        """Validate the replies, take the majority vote and step the model.

        Returns the new arrays (None when fewer than ``min_train_nodes`` valid
        replies arrived: the model stays) and the round's metrics.
        """
        if self._current_arrays is None:
            raise RuntimeError("aggregate_train called before configure_train")
        d = num_coordinates(self._current_arrays)
        tally = _Tally()
        weights = arrays_to_flat(self._current_arrays)
        outcome = run_server_round(
            weights,
            self._valid_payloads(server_round, replies, d, tally),
            updater=self.updater,
            server_round=server_round,
            num_rounds=self.num_rounds,
            min_voters=self.min_train_nodes,
        )
        missing = len(self._sampled - tally.replied)
        if missing:
            log(WARNING, "round %d: %d of %d sampled nodes did not reply in time", server_round, missing, len(self._sampled))
        metrics = MetricRecord(
            {
                "voters": outcome.voters,
                "dropped": tally.received - outcome.voters,
                "missing": missing,
                "epsilon": max(tally.epsilons) if tally.epsilons else 0.0,
                "uplink-bytes": tally.uplink_bytes,
                "payload-bytes": (d + 7) // 8,
            }
        )
        if outcome.vote is None:
            log(WARNING, "round %d: %d valid replies, fewer than min-train-nodes=%d; the model is unchanged",
                server_round, outcome.voters, self.min_train_nodes)
            return None, metrics
        return flat_to_arrays(outcome.weights, self._current_arrays), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """No client-side evaluation (not covered by the DP guarantee)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """No client-side evaluation."""
        return None

    def state_dict(self) -> dict:
        """Return the state a checkpoint needs: the updater's momentum and ``epsilon_seen``."""
        return {"updater": self.updater.state_dict(), "epsilon-seen": dict(self.epsilon_seen)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the state saved by :meth:`state_dict` (node ids may come as strings)."""
        self.updater.load_state_dict(state["updater"])
        self.epsilon_seen = {int(node): float(eps) for node, eps in state["epsilon-seen"].items()}

    def _valid_payloads(self, server_round: int, replies: Iterable[Message], d: int, tally: "_Tally") -> Iterator[np.ndarray]:
        """Yield the packed signs of each valid reply, logging why any other is dropped."""
        for message in replies:
            tally.received += 1
            node = message.metadata.src_node_id
            tally.replied.add(node)
            reason = self._rejection(message, node, tally)
            if reason is None:
                try:
                    signs, epsilon, size = parse_train_reply(message.content, d)
                except InvalidReply as error:
                    reason = str(error)
            if reason is not None:
                log(WARNING, "round %d: dropped reply of node %s: %s", server_round, node, reason)
                continue
            tally.voted.add(node)
            self._note_epsilon(server_round, node, epsilon)
            tally.epsilons.append(epsilon)
            tally.uplink_bytes += size
            yield signs

    def _rejection(self, message: Message, node: int, tally: "_Tally") -> str | None:
        """Why a reply cannot vote before its content is read, or None."""
        if node not in self._sampled:
            return "the node was not sampled this round"
        if message.has_error():
            return f"error {message.error.code}: {_last_line(message.error.reason)}"
        if node in tally.voted:  # one node, one vote: a repeated reply could outvote honest nodes
            return "a second reply in the same round"
        return None

    def _note_epsilon(self, server_round: int, node: int, epsilon: float) -> None:
        """Keep the largest epsilon per node; warn when a node's epsilon goes down.

        A client's epsilon spent never decreases while its ledger persists; a
        smaller value means its ledger was reset, so its true privacy loss is
        larger than it reports.
        """
        before = self.epsilon_seen.get(node)
        if before is not None and epsilon < before - 1e-9:
            log(WARNING, "round %d: node %s reports epsilon %.4f, below the %.4f it reported before: its "
                "privacy ledger was reset", server_round, node, epsilon, before)
        self.epsilon_seen[node] = max(epsilon, before or 0.0)


class _Tally:
    """What one round's replies amounted to, besides the payloads that voted."""

    def __init__(self) -> None:
        self.received = 0
        self.replied: set[int] = set()
        self.voted: set[int] = set()
        self.epsilons: list[float] = []
        self.uplink_bytes = 0


def _last_line(reason: str, limit: int = 300) -> str:
    """The last non-empty line of an error reason (in simulation a whole Ray traceback), shortened."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."
