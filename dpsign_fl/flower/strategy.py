"""SignMajorityVote: the Flower strategy of DP-SignSGD with majority vote.

Used like ``FedAvg`` in a ServerApp: it takes every argument of FedAvg's
constructor and of ``start`` (``SignMajorityVote(fraction_evaluate=0.5)``,
``strategy.start(grid=..., initial_arrays=..., num_rounds=...)``). Each sampled
client replies with its bit-packed DP-SIGN signs
(:mod:`dpsign_fl.flower.records`); the server takes the coordinate-wise
majority vote and steps ``w <- w - eta_t * vote`` (optionally with server
momentum), through the same server round as the research loop
(:func:`dpsign_fl.rounds.server_round`).

It has its own round loop (``start``) rather than ``Strategy.start``: round
numbers stay true when a run resumes, each round's train metrics reach the
caller's ``round_end_fn`` as an argument, and the downlink
(:mod:`dpsign_fl.flower.downlink`) can send a client the votes it missed instead
of the model, and resend the model within the round to a client that needs it.
After the last round every connected node is brought to the final model.

Faults: a reply with an error (the client raised or refused), one that breaks
the wire format, a second reply of one node, or a reply from a node that was
not sampled this round is dropped with a logged reason; the round still steps
while at least ``min_train_nodes`` valid replies arrived, and leaves the model
unchanged otherwise. A round stops waiting once every sampled node answered,
or ``grace`` seconds after ``min_train_nodes`` replies without error came, or
after ``timeout`` (:func:`dpsign_fl.flower.exchange.collect_replies`): a node
that went silent costs the grace, not the timeout.

Client-side evaluation runs the app's ``@app.evaluate()`` handler as FedAvg
does when ``fraction_evaluate > 0`` (:mod:`dpsign_fl.flower.client_evaluation`);
its replies are outside the DP guarantee, which the log says once. The default
``fraction_evaluate=0`` keeps every reply private: evaluate on the server with
``evaluate_fn``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from ..vote.model_sync import UpdateRule, check_trainable, default_trainable
from ..parameters import flatten, unflatten
from ..rounds import least_drawn, server_round as run_server_round
from ..vote.server_update import AUTOMATIC, VoteUpdater
from ..settings import CLIENT_SCHEDULES, FlowerOptions
from ..vote import DEFAULT_VOTE, VoteMemory, check_vote_rule
from .client_evaluation import (
    DEFAULT_ARRAYRECORD_KEY,
    DEFAULT_CONFIGRECORD_KEY,
    DEFAULT_EVALUATE_AGGREGATION,
    DEFAULT_WEIGHTED_BY_KEY,
    EVALUATION_WARNING,
    MetricsAggrFn,
    aggregate_evaluate_replies,
    check_fedavg_arguments,
    evaluate_messages,
    metrics_text,
)
from .downlink import Downlink
from .exchange import collect_replies
from .logs import printable
from .records import (
    BUDGET_EXHAUSTED_CODE,
    DIGEST_KEY,
    OUT_OF_SYNC_CODE,
    RELEASE_FAILED_CODE,
    SYNC_KEY,
    InvalidReply,
    content_bytes,
    parse_train_reply,
)

RoundEndFn = Callable[[int, ArrayRecord, MetricRecord, "MetricRecord | None"], None]


class SignMajorityVote(Strategy):
    """Majority vote of clients' DP-SIGN bits, with a learning-rate schedule and momentum.

    The first ten arguments are FedAvg's (Flower 1.42), in FedAvg's order and
    with its meaning where a sign vote has one.

    Args:
        fraction_train: fraction of connected nodes sampled per round, in (0, 1].
        fraction_evaluate: fraction of connected nodes that evaluate the model
            on their own data after each round, in [0, 1]. Default 0, unlike
            FedAvg's 1.0: those replies are outside the DP guarantee (logged
            once as a warning when > 0; docs/privacy.md).
        min_train_nodes: fewest valid replies that move the model (and fewest
            nodes sampled), >= 1.
        min_evaluate_nodes: fewest nodes sampled to evaluate when
            ``fraction_evaluate > 0``, >= 0.
        min_available_nodes: nodes to wait for before sampling, >= 1.
        weighted_by_key: the metric that weights the average of the evaluation
            replies, as in FedAvg. The vote itself is unweighted (one node, one
            vote); a value other than ``"num-examples"`` is logged as such.
        arrayrecord_key, configrecord_key: the record names of the model and the
            config in evaluate messages, as in FedAvg. Train messages keep
            dpsign-fl's wire format (:mod:`dpsign_fl.flower.records`), which is
            what ``dp_sign_train`` reads; other values are logged as such.
        train_metrics_aggr_fn: accepted and not used (logged if given): a sign
            reply carries only its epsilon, and the round's train metrics are
            the vote's own, listed below.
        evaluate_metrics_aggr_fn: ``fn(reply_contents, weighted_by_key)`` ->
            MetricRecord for the evaluation replies; None = FedAvg's weighted
            average.
        learning_rate: eta > 0, the step per vote, or 0 for automatic steps.
        lr_schedule: ``"constant"``, ``"linear"``, ``"cosine"`` or ``"inverse-sqrt"``.
        server_momentum: beta in [0, 1); post-processing, free of privacy cost.
        vote: ``"robust"`` (the default: :func:`dpsign_fl.vote.robust_vote`,
            payloads that look like a coordinated attack are left out first;
            server-side, free of privacy cost, O(d) memory; the strategy keeps
            a :class:`dpsign_fl.vote.VoteMemory` of each node's last payload,
            up to 16 KiB per node id, so that a node that pushes the same signs
            every round is left out; a run resumed from a checkpoint starts it
            empty) or ``"majority"`` (the plain coordinate-wise majority).
        downlink: ``"votes"`` (clients keep a replica and get the votes they
            missed, or the model when that is smaller or they need it) or
            ``"weights"`` (the model every round, for clients without a replica).
        trainable: names of the arrays of ``initial_arrays`` that the signs and
            votes cover, in the order of the flattened coordinates. None: every
            floating-point array except BatchNorm's running statistics, so that
            ``ArrayRecord(model.state_dict())`` works for the usual models; other
            buffers must be left out by naming the parameters here (a client
            whose parameters differ says so in its error).
        final_sync: after the last round, bring every connected node to the
            final model (vote downlink only).
        max_failed_rounds: stop the run (RuntimeError quoting the last reason)
            after this many rounds in a row in which replies came but none was
            valid, for a reason other than a spent privacy budget: a client
            that cannot take part (wrong model, bad data, a bug) would
            otherwise make every round a silent no-op.
        client_schedule: ``"random"`` (Flower's sampling, FedAvg's) or
            ``"balanced"``: each round the connected nodes sampled least often
            so far by this strategy (ties at random; :func:`dpsign_fl.rounds.least_drawn`),
            so that with the same nodes connected every node is sampled floor or
            ceil of T K / N times and its clients may plan with run-config
            ``participation-margin`` 0. The counts, per node id, are part of
            :meth:`state_dict`: a run resumed from a checkpoint goes on from them
            for the node ids it still sees (a new simulation's nodes get new ids).

    Each round's :class:`MetricRecord` (returned by :meth:`aggregate_train`, kept
    in ``Result.train_metrics_clientapp``) holds ``voters`` (valid replies),
    ``dropped`` (error and invalid replies), ``missing`` (sampled nodes that did
    not reply before the wait ended), ``missing-nodes`` (their node ids,
    sorted), ``epsilon`` (largest epsilon spent among the clients that
    replied), ``uplink-bytes`` (serialised sign payloads received),
    ``payload-bytes`` (ceil(d/8)), ``downlink-bytes`` (array bytes of the train
    instructions sent that round, resends included; evaluate messages, which
    carry the whole model, are not counted), ``full-syncs`` (nodes sent the
    whole model) and ``excluded`` (valid replies the robust vote left out; 0
    with majority).
    ``epsilon_seen`` maps each node id to the largest epsilon it reported; a
    node whose epsilon goes down (its ledger was reset) is logged as a warning.
    """

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = DEFAULT_WEIGHTED_BY_KEY,
        arrayrecord_key: str = DEFAULT_ARRAYRECORD_KEY,
        configrecord_key: str = DEFAULT_CONFIGRECORD_KEY,
        train_metrics_aggr_fn: MetricsAggrFn | None = None,
        evaluate_metrics_aggr_fn: MetricsAggrFn | None = None,
        *,
        learning_rate: float = AUTOMATIC,
        lr_schedule: str = "constant",
        server_momentum: float = 0.0,
        vote: str = DEFAULT_VOTE,
        downlink: str = "votes",
        trainable: list[str] | tuple[str, ...] | None = None,
        final_sync: bool = True,
        max_failed_rounds: int = 3,
        client_schedule: str = "random",
    ) -> None:
        if not 0 < fraction_train <= 1:
            raise ValueError(f"fraction_train must be in (0, 1], got {fraction_train}")
        for name, value in (("min_train_nodes", min_train_nodes), ("min_available_nodes", min_available_nodes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        check_fedavg_arguments(
            fraction_evaluate=fraction_evaluate, min_evaluate_nodes=min_evaluate_nodes,
            weighted_by_key=weighted_by_key, arrayrecord_key=arrayrecord_key, configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn, evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.train_metrics_aggr_fn = train_metrics_aggr_fn
        self.evaluate_metrics_aggr_fn = evaluate_metrics_aggr_fn or DEFAULT_EVALUATE_AGGREGATION
        self.updater = VoteUpdater(learning_rate=learning_rate, schedule=lr_schedule, momentum=server_momentum)
        self.vote = check_vote_rule(vote)
        self.downlink_mode = downlink
        self.trainable = None if trainable is None else tuple(trainable)
        self.final_sync = final_sync
        if isinstance(max_failed_rounds, bool) or not isinstance(max_failed_rounds, int) or max_failed_rounds < 1:
            raise ValueError(f"max_failed_rounds must be an integer >= 1, got {max_failed_rounds!r}")
        self.max_failed_rounds = max_failed_rounds
        if client_schedule not in CLIENT_SCHEDULES:
            raise ValueError(f"client_schedule must be one of {CLIENT_SCHEDULES}, got {client_schedule!r}")
        self.client_schedule = client_schedule
        self._draws: dict[int, int] = {}
        self._schedule_rng = np.random.default_rng()
        self._failed_rounds: list[str] = []
        self.num_rounds = 1
        self.epsilon_seen: dict[int, float] = {}
        self._downlink = Downlink(downlink, (), self._rule())
        self._current_arrays: ArrayRecord | None = None
        self._sampled: set[int] = set()
        self._sent = _Traffic()
        self._memory = VoteMemory()

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t├── Sampling: fraction %g of connected nodes per round, at least %d (waits for %d), %s",
            self.fraction_train, self.min_train_nodes, self.min_available_nodes,
            "balanced (least sampled first)" if self.client_schedule == "balanced" else "random")
        log(INFO, "\t├── %s vote of packed signs: learning rate %g (%s), server momentum %g",
            self.vote.capitalize(), self.updater.learning_rate, self.updater.schedule, self.updater.momentum)
        log(INFO, "\t├── Downlink: %s", "the votes each node missed (or the model)" if self.downlink_mode == "votes"
            else "the model every round")
        log(INFO, "\t└── Client-side evaluation: %s", "off (every reply is a DP release)" if self.fraction_evaluate == 0
            else f"fraction {self.fraction_evaluate:g}, at least {self.min_evaluate_nodes} (outside the DP guarantee)")

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
        grace: float = FlowerOptions.round_grace,
        first_round: int = 1,
        round_end_fn: RoundEndFn | None = None,
    ) -> Result:
        """Run rounds ``first_round`` .. ``num_rounds`` and return Flower's ``Result``.

        ``num_rounds`` is T, the last round of the run (a resumed run passes the
        round after its checkpoint as ``first_round`` and the same T); the
        learning-rate schedule spans T rounds. ``evaluate_fn(round, arrays)`` is
        called for the model before ``first_round`` and after every round, as in
        ``Strategy.start``; ``round_end_fn(round, arrays, train_metrics,
        evaluate_metrics)`` after that, with the round's train metrics and the
        server-side evaluation. With ``fraction_evaluate > 0``, sampled clients
        evaluate each round's model (``evaluate_config`` and ``server-round`` in
        their config) and the average lands in
        ``Result.evaluate_metrics_clientapp``, as with FedAvg.

        A round (and the final sync) waits for the replies until every node
        answered (an error counts), or until ``min_train_nodes`` replies without
        error are in and ``grace`` more seconds have passed, or ``timeout``
        seconds after sending, whichever comes first.

        Raises:
            ValueError: if ``first_round`` is not in [1, num_rounds + 1], ``timeout``
                is not > 0 or ``grace`` is negative.
        """
        if not 1 <= first_round <= num_rounds + 1:
            raise ValueError(f"first_round must be in [1, {num_rounds + 1}], got {first_round}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        if not grace >= 0:
            raise ValueError(f"grace must be >= 0, got {grace!r}")
        wait = {"timeout": timeout, "grace": grace}
        self.num_rounds = num_rounds
        self._prepare_downlink(initial_arrays)
        log(INFO, "Starting %s, rounds %d to %d:", type(self).__name__, first_round, num_rounds)
        self.summary()
        if self.fraction_evaluate > 0:
            log(WARNING, EVALUATION_WARNING, self.fraction_evaluate)
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result(arrays=initial_arrays)
        started = time.monotonic()
        if evaluate_fn is not None:
            metrics = evaluate_fn(first_round - 1, initial_arrays)
            if metrics is not None:
                result.evaluate_metrics_serverapp[first_round - 1] = metrics
        arrays = initial_arrays
        for current in range(first_round, num_rounds + 1):
            log(INFO, "[ROUND %d/%d]", current, num_rounds)
            messages = self.configure_train(current, arrays, train_config, grid)
            replies = collect_replies(grid, messages, quorum=self.min_train_nodes, **wait)
            replies = self._resend_to_stale(grid, replies, current, arrays, train_config, wait)
            updated, train_metrics = self.aggregate_train(current, replies)
            self._stop_if_clients_keep_failing(current)
            if updated is not None:
                arrays = updated
            result.arrays = arrays
            result.train_metrics_clientapp[current] = train_metrics
            log(INFO, "round %d: voters %d, dropped %d, missing %d, epsilon %.4f", current, train_metrics["voters"],
                train_metrics["dropped"], train_metrics["missing"], train_metrics["epsilon"])
            client_metrics = self._evaluate_on_clients(grid, current, arrays, evaluate_config, wait)
            if client_metrics is not None:
                result.evaluate_metrics_clientapp[current] = client_metrics
            evaluate_metrics = evaluate_fn(current, arrays) if evaluate_fn is not None else None
            if evaluate_metrics is not None:
                result.evaluate_metrics_serverapp[current] = evaluate_metrics
            if round_end_fn is not None:
                round_end_fn(current, arrays, train_metrics, evaluate_metrics)
        log(INFO, "%s finished rounds %d to %d in %.1f s", type(self).__name__, first_round, num_rounds,
            time.monotonic() - started)
        if self.final_sync and self.downlink_mode == "votes" and first_round <= num_rounds:
            self._sync_every_node(grid, arrays, wait)
        return result

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and send each the model, or the votes it missed, and the round number."""
        available = len(list(grid.get_node_ids()))
        sample_size = max(int(available * self.fraction_train), self.min_train_nodes)
        node_ids, connected = sample_nodes(grid, self.min_available_nodes, sample_size)
        if self.client_schedule == "balanced":
            connected = sorted(connected)
            chosen = least_drawn([self._draws.get(node, 0) for node in connected], len(node_ids), self._schedule_rng)
            node_ids = [connected[i] for i in chosen]
            for node in node_ids:
                self._draws[node] = self._draws.get(node, 0) + 1
        log(INFO, "round %d: sampled %d of %d nodes", server_round, len(node_ids), available)
        self._current_arrays = arrays
        self._sampled = set(node_ids)
        self._sent = _Traffic()
        if not self._downlink.trainable:
            self._prepare_downlink(arrays)
        self._downlink.begin_round(server_round, self._weights(arrays), self._update_state())
        return [self._instruction(node, server_round, arrays, config) for node in node_ids]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        """Validate the replies, take the majority vote and step the model.

        Returns the new arrays (None when fewer than ``min_train_nodes`` valid
        replies arrived: the model stays) and the round's metrics.
        """
        if self._current_arrays is None:
            raise RuntimeError("aggregate_train called before configure_train")
        weights = self._weights(self._current_arrays)
        d = weights.shape[0]
        tally = _Tally()
        outcome = run_server_round(
            weights,
            self._valid_payloads(server_round, replies, d, tally),
            updater=self.updater,
            server_round=server_round,
            num_rounds=self.num_rounds,
            min_voters=self.min_train_nodes,
            vote_rule=self.vote,
            memory=self._memory,
            identities=tally.in_order,  # filled as the payloads are read: server_round reads it after them
        )
        for position, why in sorted(outcome.excluded.items()):
            log(WARNING, "round %d: the robust vote left out node %s (%s)", server_round, tally.in_order[position], why)
        missing = sorted(self._sampled - tally.replied)
        if missing:
            log(WARNING, "round %d: %d of %d sampled nodes did not reply in time: %s", server_round, len(missing),
                len(self._sampled), _node_list(missing))
        for node in self._sampled:
            if node in tally.holds_model:
                self._downlink.node_holds(node, server_round)
            else:
                self._downlink.forget(node)
        metrics = MetricRecord(
            {
                "voters": outcome.voters,
                "dropped": tally.received - outcome.voters,
                "missing": len(missing),
                "missing-nodes": missing,
                "epsilon": max(tally.epsilons) if tally.epsilons else 0.0,
                "uplink-bytes": tally.uplink_bytes,
                "payload-bytes": (d + 7) // 8,
                "downlink-bytes": self._sent.bytes,
                "full-syncs": self._sent.full,
                "excluded": len(outcome.excluded),
            }
        )
        if outcome.voters == 0 and tally.reasons and not tally.budget_refusals:
            self._failed_rounds.append(tally.reasons[-1])
        else:
            self._failed_rounds = []
        if outcome.vote is None:
            log(WARNING, "round %d: %d valid replies, fewer than min-train-nodes=%d; the model is unchanged",
                server_round, outcome.voters, self.min_train_nodes)
            return None, metrics
        full_bytes = sum(len(a.data) for a in self._current_arrays.values())
        self._downlink.record_vote(server_round, outcome.vote, full_bytes)
        return self._with_weights(self._current_arrays, outcome.weights), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Sample nodes to evaluate ``arrays`` on their own data, as FedAvg does; none when ``fraction_evaluate`` is 0."""
        if self.fraction_evaluate == 0:
            return []
        sample_size = max(int(len(list(grid.get_node_ids())) * self.fraction_evaluate), self.min_evaluate_nodes)
        if sample_size == 0:
            return []
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, sample_size)
        return evaluate_messages(node_ids, server_round, arrays, config, arrayrecord_key=self.arrayrecord_key,
                                 configrecord_key=self.configrecord_key)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Average the evaluation replies (``evaluate_metrics_aggr_fn``); None when none could be averaged."""
        return aggregate_evaluate_replies(
            server_round, replies, weighted_by_key=self.weighted_by_key, aggregate=self.evaluate_metrics_aggr_fn,
            describe_error=_error_text,
        )

    def state_dict(self) -> dict:
        """Return the state a checkpoint needs: the updater's momentum, ``epsilon_seen`` and how often each node
        was sampled (``draws``, what the balanced schedule goes on from)."""
        return {"updater": self.updater.state_dict(), "epsilon-seen": dict(self.epsilon_seen), "draws": dict(self._draws)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the state saved by :meth:`state_dict` (node ids may come as strings; no ``draws``: none counted)."""
        self.updater.load_state_dict(state["updater"])
        self.epsilon_seen = {int(node): float(eps) for node, eps in state["epsilon-seen"].items()}
        self._draws = {int(node): int(times) for node, times in state.get("draws", {}).items()}

    def _evaluate_on_clients(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord, wait: dict
    ) -> MetricRecord | None:
        """Client-side evaluation of the round's model (outside the DP guarantee); None when off or nothing came."""
        messages = list(self.configure_evaluate(server_round, arrays, config, grid))
        if not messages:
            return None
        replies = collect_replies(grid, messages, quorum=min(self.min_evaluate_nodes, len(messages)), **wait)
        metrics = self.aggregate_evaluate(server_round, replies)
        if metrics is not None:
            log(INFO, "round %d: client-side evaluation, %d of %d nodes (outside the DP guarantee): %s", server_round,
                sum(1 for r in replies if not r.has_error()), len(messages), metrics_text(metrics))
        return metrics

    def _stop_if_clients_keep_failing(self, server_round: int) -> None:
        if len(self._failed_rounds) >= self.max_failed_rounds:
            raise RuntimeError(
                f"round {server_round}: {len(self._failed_rounds)} rounds in a row got replies but no valid one; "
                f"the last reason: {self._failed_rounds[-1]}"
            )

    def _prepare_downlink(self, arrays: ArrayRecord) -> None:
        """Learn which arrays the votes move (``trainable``, else the default rule) for this run."""
        values = {name: array.numpy() for name, array in arrays.items()}
        trainable = check_trainable(values, self.trainable) if self.trainable else default_trainable(values)
        self.updater.start(flatten(values[name] for name in trainable))  # automatic steps: the step scale
        self._downlink = Downlink(self.downlink_mode, trainable, self._rule())

    def _rule(self) -> UpdateRule:
        return UpdateRule(
            self.updater.learning_rate, self.updater.schedule, self.updater.momentum, self.num_rounds, self.updater.step_scale
        )

    def _weights(self, arrays: ArrayRecord) -> np.ndarray:
        """The trainable arrays as one float32 vector (the coordinates of signs and votes)."""
        trainable = self._downlink.trainable or tuple(arrays.keys())
        return flatten(arrays[name].numpy() for name in trainable)

    def _update_state(self) -> np.ndarray | None:
        return self.updater.state_dict()["update-state"]

    def _with_weights(self, arrays: ArrayRecord, weights: np.ndarray) -> ArrayRecord:
        """``arrays`` with the trainable ones replaced by ``weights`` (others, and the order, kept)."""
        trainable = self._downlink.trainable or tuple(arrays.keys())
        shapes = {name: (tuple(arrays[name].shape), np.dtype(arrays[name].dtype)) for name in trainable}
        new = unflatten(weights, shapes)
        return ArrayRecord(array_dict={name: Array(new[name]) if name in new else array for name, array in arrays.items()})

    def _instruction(self, node: int, server_round: int, arrays: ArrayRecord, config: ConfigRecord, **kwargs) -> Message:
        content, full = self._downlink.instruction(node, server_round, arrays, self._update_state(), config, **kwargs)
        self._sent.add(content_bytes(content), full)
        return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)

    def _resend_to_stale(
        self, grid: Grid, replies: list[Message], server_round: int, arrays: ArrayRecord, config: ConfigRecord,
        wait: dict, **kwargs,
    ) -> list[Message]:
        """Send the full model, in the same round, to the nodes that answered "out of sync".

        The quorum counts the replies without error already in: once it is met,
        the resent nodes get ``grace`` seconds.
        """
        stale = [r.metadata.src_node_id for r in replies if r.has_error() and r.error.code == OUT_OF_SYNC_CODE]
        if not stale:
            return replies
        log(INFO, "round %d: %d nodes did not hold the model the votes apply to: sending them the model", server_round, len(stale))
        resend = [self._instruction(node, server_round, arrays, config, full=True, **kwargs) for node in stale]
        kept = [r for r in replies if not (r.has_error() and r.error.code == OUT_OF_SYNC_CODE)]
        quorum = max(0, self.min_train_nodes - sum(1 for r in kept if not r.has_error()))
        return kept + collect_replies(grid, resend, quorum=quorum, **wait)

    def _sync_every_node(self, grid: Grid, arrays: ArrayRecord, wait: dict) -> None:
        """Bring every connected node to the final model (no release: a sync-only instruction).

        The wait ends as a round's does, with ``min_train_nodes`` acknowledgements as the quorum.
        """
        nodes = list(grid.get_node_ids())
        final_round = self.num_rounds + 1
        digest = self._downlink.begin_round(final_round, self._weights(arrays), self._update_state())
        self._sent = _Traffic()
        messages = [self._instruction(node, final_round, arrays, ConfigRecord(), sync_only=True) for node in nodes]
        replies = collect_replies(grid, messages, quorum=self.min_train_nodes, **wait)
        replies = self._resend_to_stale(grid, replies, final_round, arrays, ConfigRecord(), wait, sync_only=True)
        synced = sum(
            1 for r in replies
            if not r.has_error() and SYNC_KEY in r.content and r.content[SYNC_KEY].get(DIGEST_KEY) == digest
        )
        silent = sorted(set(nodes) - {r.metadata.src_node_id for r in replies})
        log(INFO, "final sync: %d of %d nodes hold the final model (%d array bytes sent, %d full models)%s",
            synced, len(nodes), self._sent.bytes, self._sent.full,
            f"; no reply from nodes {_node_list(silent)}" if silent else "")

    def _valid_payloads(self, server_round: int, replies: Iterable[Message], d: int, tally: "_Tally") -> Iterator[np.ndarray]:
        """Yield the packed signs of each valid reply, logging why any other is dropped."""
        for message in replies:
            tally.received += 1
            node = message.metadata.src_node_id
            tally.replied.add(node)
            if message.has_error() and message.error.code in _HOLDS_MODEL_CODES:
                tally.holds_model.add(node)
            reason = self._rejection(message, node, tally)
            if reason is None:
                try:
                    signs, epsilon, size = parse_train_reply(message.content, d)
                except InvalidReply as error:
                    reason = str(error)
            if reason is not None:
                reason = printable(reason)  # client text: one bounded line, nothing a terminal acts on
                log(WARNING, "round %d: dropped reply of node %s: %s", server_round, node, reason)
                tally.reasons.append(f"node {node}: {reason}")
                if message.has_error() and message.error.code == BUDGET_EXHAUSTED_CODE:
                    tally.budget_refusals += 1
                continue
            tally.voted.add(node)
            tally.in_order.append(node)
            tally.holds_model.add(node)
            self._note_epsilon(server_round, node, epsilon)
            tally.epsilons.append(epsilon)
            tally.uplink_bytes += size
            yield signs

    def _rejection(self, message: Message, node: int, tally: "_Tally") -> str | None:
        """Why a reply cannot vote before its content is read, or None."""
        if node not in self._sampled:
            return "the node was not sampled this round"
        if message.has_error():
            return _error_text(message)
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


_HOLDS_MODEL_CODES = (BUDGET_EXHAUSTED_CODE, RELEASE_FAILED_CODE)
"""Error replies sent after the client reached the round's model: a refusal, a failed release."""


class _Tally:
    """What one round's replies amounted to, besides the payloads that voted."""

    def __init__(self) -> None:
        self.received = 0
        self.replied: set[int] = set()
        self.voted: set[int] = set()
        self.in_order: list[int] = []
        self.holds_model: set[int] = set()
        self.epsilons: list[float] = []
        self.uplink_bytes = 0
        self.reasons: list[str] = []
        self.budget_refusals = 0


class _Traffic:
    """What the server sent in one round: array bytes and how many full models."""

    def __init__(self) -> None:
        self.bytes = 0
        self.full = 0

    def add(self, size: int, full: bool) -> None:
        self.bytes += size
        self.full += int(full)


def _node_list(nodes: list[int], shown: int = 20) -> str:
    """Node ids for a log line: the first ``shown`` of them, and how many more."""
    more = f" and {len(nodes) - shown} more" if len(nodes) > shown else ""
    return f"{nodes[:shown]}{more}"


def _error_text(message: Message) -> str:
    """``error <code>: <the last line of the reason>`` of an error reply (client text: printable it before use)."""
    return f"error {message.error.code}: {_last_line(message.error.reason or '')}"


def _last_line(reason: str) -> str:
    """The last non-empty line of an error reason (in simulation a whole Ray traceback)."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return lines[-1] if lines else ""
