"""SignMajorityVote: Flower strategy for DP-SignSGD with majority vote.

Used like ``FedAvg`` in a ServerApp. Differences: each client replies with its
bit-packed signs (see :mod:`dpsign_fl.flower.records`), the server takes the
coordinate-wise majority vote and steps ``w <- w - eta_t * vote`` (optionally
with server momentum). Only the train aggregation and the train configuration
differ from ``FedAvg``.
"""

from __future__ import annotations

from collections.abc import Iterable
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

    After each round ``round_metrics[round]`` holds ``voters``, ``dropped``,
    ``epsilon`` (largest epsilon spent among the clients that replied),
    ``uplink-bytes`` (serialised sign payloads received) and
    ``payload-bytes`` (ceil(d/8)).
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
        self._current_arrays: ArrayRecord | None = None

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

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, *args, **kwargs) -> Result:
        """Run ``num_rounds`` rounds (as ``Strategy.start``); the schedule spans them."""
        if self.num_rounds is None:
            self.updater.num_rounds = num_rounds
        return super().start(grid, initial_arrays, num_rounds, *args, **kwargs)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes as FedAvg does and remember the model the votes will move."""
        self._current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, take the majority vote and step the model.

        A reply with an error or that breaks the wire format is dropped with a
        logged reason; the others still count. With no valid reply the model is
        left unchanged (``None`` is returned for the arrays).
        """
        if self._current_arrays is None:
            raise RuntimeError("aggregate_train called before configure_train")
        d = num_coordinates(self._current_arrays)
        packed, epsilons, uplink_bytes, dropped = [], [], 0, 0
        for message in replies:
            node = message.metadata.src_node_id
            if message.has_error():
                dropped += 1
                log(WARNING, "round %d: dropped reply of node %s: error %s", server_round, node, message.error.reason)
                continue
            try:
                signs, _, epsilon, size = parse_train_reply(message.content, d)
            except InvalidReply as error:
                dropped += 1
                log(WARNING, "round %d: dropped reply of node %s: %s", server_round, node, error)
                continue
            packed.append(signs)
            epsilons.append(epsilon)
            uplink_bytes += size
        metrics = {
            "voters": len(packed),
            "dropped": dropped,
            "epsilon": max(epsilons) if epsilons else 0.0,
            "uplink-bytes": uplink_bytes,
            "payload-bytes": (d + 7) // 8,
        }
        self.round_metrics[server_round] = metrics
        if not packed:
            log(WARNING, "round %d: no valid reply; the model is unchanged", server_round)
            return None, MetricRecord(metrics)
        vote = majority_vote(np.stack(packed), d)
        weights = arrays_to_flat(self._current_arrays)
        updated = self.updater.step(weights, vote, server_round)
        return flat_to_arrays(updated, self._current_arrays), MetricRecord(metrics)
